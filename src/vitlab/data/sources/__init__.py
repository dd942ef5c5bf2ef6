"""One module a dataset format: each returns :class:`~vitlab.data.loader.ArrayDataset` splits at native size."""
