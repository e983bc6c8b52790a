"""Build script for the middleware C extensions: middleware._native (sampler, exporter) and
middleware._upload (the uploader, the only one linked against libcurl and json-c; imported only
when an upload is configured, so other processes never load those libraries).

The extension reads CPython's private structures, so it is compiled per CPython minor version
against that interpreter's internal headers (include/pythonX.Y/internal).
"""
import glob
import os
import sys
import sysconfig

# The CPython minor versions whose internal layouts csrc/mw_pyframes.c knows (first, last); the
# same range as middleware.SUPPORTED_PYTHON. Checked before anything else, so that pip on an
# older Python says so instead of failing to resolve a dependency.
SUPPORTED_PYTHON = ((3, 10), (3, 13))
if sys.version_info[:2] < SUPPORTED_PYTHON[0]:
    sys.exit("error: middleware: Python >= %d.%d required (this is Python %d.%d.%d)"
             % (*SUPPORTED_PYTHON[0], *sys.version_info[:3]))
if not os.environ.get("MW_SKIP_EXT") and (
        sys.implementation.name != "cpython" or sys.version_info[:2] > SUPPORTED_PYTHON[1]):
    sys.exit("error: middleware: cannot build the sampler for %s %d.%d.%d: it reads CPython's internal "
             "structures and knows CPython %d.%d to %d.%d only"
             % (sys.implementation.name, *sys.version_info[:3], *SUPPORTED_PYTHON[0], *SUPPORTED_PYTHON[1]))

from setuptools import Extension, setup  # noqa: E402
from setuptools.command.build_ext import build_ext  # noqa: E402

# The C headers the extensions include, each with the Debian/Ubuntu package that ships it (and the
# Fedora/RHEL one): checked before compiling, so that a machine without them gets one line naming
# every missing package instead of a compiler error.
HEADERS = (
    ("zlib.h", "zlib1g-dev", "zlib-devel"),
    ("protobuf-c/protobuf-c.h", "libprotobuf-c-dev", "protobuf-c-devel"),
    ("libunwind.h", "libunwind-dev", "libunwind-devel"),
    ("libelf.h", "libelf-dev", "elfutils-libelf-devel"),
    ("curl/curl.h", "libcurl4-openssl-dev", "libcurl-devel"),
    ("json-c/json.h", "libjson-c-dev", "json-c-devel"),
)


class BuildExt(build_ext):
    """Builds the extensions in parallel, after checking that every C header they need is found."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1

    def build_extensions(self) -> None:
        missing = [h for h in HEADERS if not self._header_found(h[0])]
        if missing:
            sys.exit("error: middleware: cannot build the C extension: C headers not found: %s; install %s "
                     "(Debian/Ubuntu; Fedora/RHEL: %s), or install a binary wheel"
                     % (", ".join(h[0] for h in missing), " ".join(h[1] for h in missing),
                        " ".join(h[2] for h in missing)))
        super().build_extensions()

    def _header_found(self, header: str) -> bool:
        import tempfile

        from setuptools.errors import CompileError

        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "probe.c")
            with open(src, "w") as f:
                f.write("#include <%s>\n" % header)
            saved = os.dup(2)  # the compiler's "No such file" lines would bury the one line that matters
            try:
                with open(os.devnull, "w") as null:
                    os.dup2(null.fileno(), 2)
                self.compiler.preprocess(src, os.path.join(tmp, "probe.i"))
            except CompileError:
                return False
            finally:
                os.dup2(saved, 2)
                os.close(saved)
        return True


include = sysconfig.get_paths()["include"]
# The uploader: csrc/mw_upload*.c (see csrc/mw_upload_ctx.h), its module glue, the push.v1 code and
# the OTLP exporter's converter (csrc/mw_otlp*.c, the OTLP code generated under csrc/gen/otlp, and its
# own copy of the pprof code, which it reads), and the starter of the profiler's threads it shares.
otlp_gen = sorted(glob.glob("csrc/gen/otlp/**/*.c", recursive=True))
upload_only = (sorted(glob.glob("csrc/mw_upload*.c")) + sorted(glob.glob("csrc/mw_otlp*.c"))
               + ["csrc/mw_module_upload.c", "csrc/gen/push.pb-c.c"] + otlp_gen)
upload_sources = upload_only + ["csrc/gen/profile.pb-c.c", "csrc/mw_ownthread.c"]
sources = sorted(set(glob.glob("csrc/*.c") + glob.glob("csrc/gen/*.c")) - set(upload_only))
gen_headers = sorted(glob.glob("csrc/gen/**/*.h", recursive=True))
extra_compile = ["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-fvisibility=hidden",
                 "-Wno-missing-field-initializers", "-Wno-unused-parameter"]
extra_link = []
if os.environ.get("MW_SANITIZE"):
    flags = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
    extra_compile += flags + ["-O1", "-g"]
    extra_link += flags
else:
    extra_compile += ["-O2", "-g"]

# MW_SKIP_EXT=1: metadata-only install (entry points, editable path); the extension itself is
# built in place by `make build` (setup.py build_ext --inplace).
setup(
    cmdclass={"build_ext": BuildExt},
    ext_modules=[] if os.environ.get("MW_SKIP_EXT") else [
        Extension(
            "middleware._native",
            sources=sources,
            depends=sorted(glob.glob("csrc/*.h") + glob.glob("csrc/gen/*.h")),
            include_dirs=["csrc", "csrc/gen", os.path.join(include, "internal")],
            libraries=["protobuf-c", "z", "unwind", "elf", "pthread"],
            extra_compile_args=extra_compile,
            extra_link_args=extra_link,
        ),
        Extension(
            "middleware._upload",
            sources=upload_sources,
            depends=sorted(glob.glob("csrc/*.h")) + gen_headers,
            include_dirs=["csrc", "csrc/gen", "csrc/gen/otlp"],
            libraries=["curl", "json-c", "protobuf-c", "z", "pthread"],
            extra_compile_args=extra_compile,
            extra_link_args=extra_link,
        ),
    ],
)
