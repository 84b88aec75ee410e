"""The one compiled part: BLAKE3 subtree sums (src/backupninja_kvm/_b3tree.c).

It is built from the reference C implementation of BLAKE3 that Debian ships in
librust-blake3-dev (BLAKE3_C_DIR overrides where). Without those sources the
package installs without it and hashes whole files, as before.
"""

import glob
import os
import platform
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    """Lets the compiler take the reference implementation's assembly (.S)."""

    def build_extensions(self) -> None:
        self.compiler.src_extensions.append(".S")
        super().build_extensions()


def blake3_sources() -> str | None:
    given = os.environ.get("BLAKE3_C_DIR")
    if given:
        return given
    found = sorted(glob.glob("/usr/share/cargo/registry/blake3-*/c/blake3.c"))
    return os.path.dirname(found[-1]) if found else None


def extensions() -> list[Extension]:
    folder = blake3_sources()
    if not folder:
        print(
            "setup.py: no BLAKE3 C sources (apt install librust-blake3-dev): "
            "building without _b3tree",
            file=sys.stderr,
        )
        return []
    sources = ["src/backupninja_kvm/_b3tree.c"]
    sources += [os.path.join(folder, name) for name in ("blake3_dispatch.c", "blake3_portable.c")]
    macros = []
    if platform.machine() in ("x86_64", "AMD64"):
        sources += [
            os.path.join(folder, f"blake3_{kind}_x86-64_unix.S")
            for kind in ("sse2", "sse41", "avx2", "avx512")
        ]
    else:
        macros = [(f"BLAKE3_NO_{kind}", "1") for kind in ("SSE2", "SSE41", "AVX2", "AVX512")]
    return [
        Extension(
            "backupninja_kvm._b3tree",
            sources=sources,
            include_dirs=[folder],
            define_macros=macros,
            extra_compile_args=["-O3"],
        )
    ]


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
