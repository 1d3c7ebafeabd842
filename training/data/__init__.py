"""Data in: model loading (``models``), the text corpus (``corpus``), block hooks
(``hooks``), activation capture (``capture``) and the on-disk activation store
(``activations``). Imports no other ``training`` subpackage."""
