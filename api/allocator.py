"""Which malloc Ladder's processes use.

Training from the store allocates and frees batches of varying shape every step. glibc's malloc
keeps what it frees in fragmented heaps and rarely hands it back, so a trainer's resident memory
grows with the number of steps, i.e. with the store (measured: 350 / 618 / 791 MB training on
2k / 8k / 23k examples). jemalloc returns freed pages, and the same epochs stay flat at about
a third of that at ~the same speed. It can only be chosen when a process starts (LD_PRELOAD), so
the `ladder` command starts itself again under jemalloc when the library is installed
(Debian/Ubuntu: `apt-get install libjemalloc2`; `make install` does it where it can).

LADDER_ALLOCATOR: `auto` (default: jemalloc for `ladder train` and `ladder finetune` when it is
installed, the system's malloc otherwise), `jemalloc` (every command; an error when missing),
`system` (never switch).

Training runs jemalloc with one arena (TRAINING_CONF): by default each thread that allocates
(the training loop, zarr's reader threads, torch's) may get an arena of its own, each keeping its
own freed pages for reuse. Measured on 2 cores, 2 epochs of `ladder train` on an 8k-example
store, three runs of one build each: peaks above the trainer's start of 102.8, 109.2 and 79.2 MB
with the default arenas, 77.3, 78.6 and 77.7 with one, at the same speed within noise. A
MALLOC_CONF of the user's comes after it, so it wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import os
import platform
import re
import sys

ENV = "LADDER_ALLOCATOR"
CHOICES = ("auto", "jemalloc", "system")
_PATTERNS = (
    "/usr/lib/*-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
)


class AllocatorError(RuntimeError):
    pass


def jemalloc_library() -> str | None:
    """Path (or soname the dynamic linker resolves) of an installed jemalloc, else None."""
    for pattern in _PATTERNS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return ctypes.util.find_library("jemalloc")


def wanted(env: dict[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    choice = env.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise AllocatorError(f"{ENV}={choice!r} is not one of {', '.join(CHOICES)}")
    return choice


TRAINING_CONF = "narenas:1"  # jemalloc's settings for training commands (see above)


def preload_env(
    env: dict[str, str] | None = None, command: str | None = None
) -> dict[str, str] | None:
    """The environment that starts a process (running `command`) on jemalloc, or None when it
    should not switch (LADDER_ALLOCATOR=system, already preloaded, or `auto` with no jemalloc
    installed)."""
    env = dict(os.environ if env is None else env)
    choice = wanted(env)
    preload = env.get("LD_PRELOAD", "")
    if choice == "system" or "jemalloc" in preload:
        return None
    if choice == "auto" and re.search(r"tcmalloc|mimalloc", preload):
        return None  # the user preloads another allocator already: theirs stands
    library = jemalloc_library()
    if library is None:
        if choice == "jemalloc":
            raise AllocatorError(
                f"{ENV}=jemalloc but no libjemalloc is installed: install it "
                f"(apt-get install libjemalloc2) or unset {ENV}"
            )
        return None
    env["LD_PRELOAD"] = f"{library} {preload}".strip()
    if command in AUTO_COMMANDS:
        env["MALLOC_CONF"] = ",".join(filter(None, [TRAINING_CONF, env.get("MALLOC_CONF")]))
    return env


# Where jemalloc was measured to help: training from a store (flat memory). Elsewhere it costs
# speed (MiniLM's forward pass, batch 32, 2 cores: 226 ms against glibc's 208), so `auto` leaves
# serving and caching on the system's malloc; LADDER_ALLOCATOR=jemalloc switches every command.
AUTO_COMMANDS = ("train", "finetune")


def restart_on_jemalloc(command: str) -> None:
    """Replaces this process with the same command line (`sys.orig_argv`: the interpreter, its
    flags, the script or -m module, the arguments) on jemalloc, if it should switch; returns
    otherwise. Call it before anything heavy is imported."""
    if not sys.platform.startswith("linux"):
        return
    if wanted() == "auto" and command not in AUTO_COMMANDS:
        return
    env = preload_env(command=command)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


@functools.cache
def _on_glibc_malloc() -> bool:
    from side_trainer.memory import allocator

    return platform.libc_ver()[0] == "glibc" and allocator() != "jemalloc"


def release_freed_memory() -> bool:
    """Hand the memory glibc's malloc holds free back to the system (malloc_trim): glibc keeps
    what a process frees for its next allocations, so after side models are unloaded the
    server's resident memory stays at its high-water mark. Measured on 2 cores: 1.7 ms with the
    MiniLM backbone and 20 side models loaded. False where malloc is not glibc's (another C
    library, or jemalloc preloaded, which returns freed pages by itself)."""
    if not _on_glibc_malloc():
        return False
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True
