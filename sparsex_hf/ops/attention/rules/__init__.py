"""The shared rules: the selection rules every backend follows (``common``), documents and padding
(``documents``), the kernels' document and tile layout (``layout``) and the dense/sparse cost model (``cost``)."""
