"""The project's one compiled part (everything else is in pyproject.toml): pipelines/jpeg_region.c, the FFCV
backend's region JPEG decoder, loaded with ctypes (no Python API, hence the version-free abi3 name)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("pipelines._jpeg_region", ["pipelines/jpeg_region.c"], libraries=["jpeg"],
                             extra_compile_args=["-O2"], py_limited_api=True)])
