"""napari live viewer and widgets (the only package that imports Qt or napari)."""
