"""The web page and JSON API over a trained model (``vitlab serve``): :func:`serve`, :func:`create_app`."""

from vitlab.server.app import Limits, RunningServer, create_app, serve
from vitlab.server.model import ServedModel, Upload, model_card

__all__ = ["serve", "create_app", "Limits", "RunningServer", "ServedModel", "Upload", "model_card"]
