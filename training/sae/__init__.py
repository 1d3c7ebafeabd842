"""The sparse autoencoder: the model and its maths (``autoencoder``), the sparse
encode/decode kernels (``kernels``), the saved folder (``folder``) and conversion to and from
SAELens' format (``saelens``), and readers of the folders other libraries write
(``saelens_read``, ``sparsify_read``, ``dictlearn_read``). Imports no other ``training``
subpackage."""
