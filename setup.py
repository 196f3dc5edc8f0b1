"""Build the optional C accelerator; everything else is declared in pyproject.toml."""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SPEEDUPS = "balancer._speedups"


class OptionalBuildExt(build_ext):
    """build_ext that says plainly when the C accelerator could not be built, instead of a compiler traceback."""

    def build_extension(self, ext):
        """Build ext; when the optional one fails, print one line saying the Python hand-off will be used."""
        try:
            super().build_extension(ext)
        except Exception as exc:  # CompileError, LinkError, a missing compiler: all mean the same to a user
            if not ext.optional:
                raise
            # The compiler's own messages are above; this line is the one to find in a long build log.
            print(f"balancer: the C accelerator {ext.name} was not built ({type(exc).__name__}): the master "
                  f"will hand connections off in Python; install a C compiler and the Python headers "
                  f"(Debian: gcc python3-dev) and reinstall to get it", file=sys.stderr, flush=True)


# optional=True: without a C compiler the install still succeeds and balancer/handoff.py uses Python (and the
# master logs a warning at start, since pip hides this build's output).
setup(ext_modules=[Extension(SPEEDUPS, ["balancer/_speedups.c"], optional=True,
                             extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                                 "-Wno-missing-field-initializers"])],
      cmdclass={"build_ext": OptionalBuildExt})
