"""Only here to build the native core: cffi's setuptools hook compiles native/ into pyccl._native."""
from setuptools import setup

setup(cffi_modules=["native/build.py:ffibuilder", "native/build_verbs.py:ffibuilder"])
