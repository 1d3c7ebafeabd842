"""The sparse autoencoder: the model and its maths (``autoencoder``), the sparse
encode/decode kernels (``kernels``), the saved folder (``folder``) and conversion to and from
SAELens' format (``saelens``). Imports no other ``training`` subpackage."""
