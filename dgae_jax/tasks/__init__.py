"""Tasks plug a model, its loss, data and evaluation into the shared trainer."""
