"""Builds the optional C prefix-hash chain; all other metadata lives in pyproject.toml.

`optional=True`: without a compiler or xxhash.h (Debian: libxxhash-dev) the install still succeeds
and cacheproxy.cache.hashing falls back to its Python loop, which gives the same bytes.
"""

from __future__ import annotations

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "cacheproxy.cache._hashchain",
            sources=["cacheproxy/cache/_hashchain.c"],
            # The loops are the point of this module; some interpreters build extensions without
            # optimisation (their CFLAGS lack -O), which makes them several times slower.
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
