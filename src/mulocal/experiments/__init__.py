"""Experiments built on the library: the paper's figures (``reproduce``) and the muTransfer demo (``demo``)."""
