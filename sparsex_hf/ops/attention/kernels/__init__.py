"""The Triton kernels: the block selection (``select``), the prefill attention forward and backward
(``prefill``), the decode step (``decode``) and their launch shapes per GPU (``tuning``, ``tiles.json``)."""
