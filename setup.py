"""The project's one compiled part, and it is optional: pipelines/crop_decode.c, the photo paths' crop decoder
(loaded with ctypes by pipelines/crop_library.py: no Python API, hence the version-free abi3 name). Everything else
is in pyproject.toml.

Where no C compiler or no libjpeg headers are found, or the build fails, the install goes on without it (one
warning line): the FFCV backend then decodes photos with FFCV's own decoders, and the photo backend with Pillow.
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that skips an extension it cannot build instead of failing the install."""

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # no compiler (DistutilsExecError, FileNotFoundError), no jpeglib.h (CompileError)
            print(f"warning: not building {ext.name} ({type(exc).__name__}: {exc}); the photo paths will decode "
                  "with FFCV's own decoders and Pillow. Install a C compiler and libjpeg headers to build it.",
                  file=sys.stderr)


setup(ext_modules=[Extension("beton_trainer.pipelines._crop_decode", ["pipelines/crop_decode.c"],
                             libraries=["jpeg", "m"], extra_compile_args=["-O3"], py_limited_api=True)],
      cmdclass={"build_ext": OptionalBuildExt})
