"""setuptools shim: the cffi extension (blkpy.gntdev._native) is declared here because
cffi_modules is a setup() keyword that pyproject metadata cannot express."""

from setuptools import setup

setup(cffi_modules=["blkpy/gntdev/build_native.py:ffibuilder"])
