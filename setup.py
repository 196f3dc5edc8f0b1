"""Build the optional C accelerator; everything else is declared in pyproject.toml."""

from setuptools import Extension, setup

# optional=True: without a C compiler the install still succeeds and balancer/handoff.py uses Python.
setup(ext_modules=[Extension("balancer._speedups", ["balancer/_speedups.c"], optional=True,
                             extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                                 "-Wno-missing-field-initializers"])])
