"""The PyTorch reference (the executable form of ``docs/spec.md``, and the CPU backend): the whole-sequence op
(``naive``) and the decode step (``decode``)."""
