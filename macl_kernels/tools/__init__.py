"""The tools wing: the ``macl-kernels`` command (info, verify, bench, profile, kernels) and what
it measures with (cases, roofline, report, inventory). Above the library and the primitive, which
it reaches through their public names only (``tests/test_wings.py``); nothing below imports it.
"""
