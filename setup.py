"""The project's one compiled part (everything else is in pyproject.toml): pipelines/crop_decode.c, the FFCV
backend's crop decoding and resizing, loaded with ctypes (no Python API, hence the version-free abi3 name)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("pipelines._crop_decode", ["pipelines/crop_decode.c"], libraries=["jpeg", "m"],
                             extra_compile_args=["-O3"], py_limited_api=True)])
