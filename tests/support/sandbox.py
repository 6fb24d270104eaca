"""Run a command under the seccomp rules a systemd unit declares, without systemd.

The container the tests run in has no systemd as PID 1, so ``systemd-run -p ...`` is not
available. The parts of a unit's sandbox that are seccomp filters can still be reproduced
exactly: this module reads ``SystemCallFilter=``, ``SystemCallErrorNumber=``,
``RestrictAddressFamilies=``, ``MemoryDenyWriteExecute=`` and ``SystemCallArchitectures=`` from a
unit file, builds the same filters with libseccomp (the library systemd itself uses) and
``exec``\\ s the command under them::

    python -m tests.support.sandbox --unit systemd/peerd.service -- python -m peerd run

Semantics follow systemd 252 (Debian 12):

* ``SystemCallFilter=`` allow-list: syscall groups expand through ``systemd-analyze
  syscall-filter``; later ``~`` entries remove calls from the list. A call in ``@known`` but not
  allowed fails with ``SystemCallErrorNumber=`` (EPERM here); a call systemd does not know fails
  with ENOSYS so that libc falls back (systemd >= 250 behaviour).
* ``MemoryDenyWriteExecute=yes``: ``mmap`` with both PROT_WRITE and PROT_EXEC, ``mprotect`` and
  ``pkey_mprotect`` adding PROT_EXEC, ``shmat`` with SHM_EXEC fail with EPERM.
* ``RestrictAddressFamilies=``: ``socket()`` with a family not listed fails with EAFNOSUPPORT.
* ``SystemCallArchitectures=native``: libseccomp's default, other ABIs are killed.

Namespaces, mounts and capabilities (``ProtectSystem=`` and friends) are not reproduced; they need
PID 1 and are checked by ``systemd-analyze security`` instead.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import mmap
import os
import socket
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ = 4
SCMP_CMP_GE = 5
SCMP_CMP_MASKED_EQ = 7
SHM_EXEC = 0o100000
# Highest address family number systemd 252 knows; anything at or above it is refused too.
AF_MAX = 46


def scmp_act_errno(code: int) -> int:
    """libseccomp's ``SCMP_ACT_ERRNO(code)``."""
    return 0x00050000 | (code & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [  # noqa: RUF012 - ctypes wants a class attribute
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


@dataclass
class UnitSandbox:
    """The seccomp-relevant settings of one ``[Service]`` section."""

    allow: set[str] | None = None
    errno_name: str = "EPERM"
    families: set[str] | None = None
    deny_write_execute: bool = False
    native_only: bool = False
    _groups: dict[str, list[str]] = field(default_factory=dict, repr=False)


def parse_unit(text: str) -> UnitSandbox:
    """Read the seccomp settings of a unit file's ``[Service]`` section."""
    box = UnitSandbox()
    groups = syscall_groups()
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section != "[Service]" or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if key == "SystemCallFilter":
            if not value:
                box.allow = None
                continue
            negate = value.startswith("~")
            names = expand(value.lstrip("~").split(), groups)
            if negate:
                if box.allow is None:
                    raise ValueError("deny-list SystemCallFilter= is not supported here")
                box.allow -= names
            else:
                box.allow = (box.allow or set()) | names
        elif key == "SystemCallErrorNumber":
            box.errno_name = value
        elif key == "RestrictAddressFamilies":
            if value.startswith("~"):
                raise ValueError("deny-list RestrictAddressFamilies= is not supported here")
            box.families = (box.families or set()) | set(value.split())
        elif key == "MemoryDenyWriteExecute":
            box.deny_write_execute = value in ("yes", "true", "1", "on")
        elif key == "SystemCallArchitectures":
            box.native_only = value == "native"
    box._groups = groups
    return box


def syscall_groups() -> dict[str, list[str]]:
    """Every ``@group`` and its members, as this host's ``systemd-analyze`` lists them."""
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter", "--no-pager"],  # noqa: S607
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.startswith("    ") and current is not None:
            item = line.strip()
            if item and not item.startswith("#"):
                current.append(item)
        elif not line.strip():
            current = None
    if "@system-service" not in groups or "@known" not in groups:
        raise RuntimeError("systemd-analyze syscall-filter gave no @system-service/@known")
    return groups


def expand(names: Iterable[str], groups: dict[str, list[str]]) -> set[str]:
    """Syscall names with every ``@group`` expanded recursively."""
    out: set[str] = set()
    stack = list(names)
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name.startswith("@"):
            if name in seen:
                continue
            seen.add(name)
            if name not in groups:
                raise ValueError(f"unknown syscall group {name}")
            stack.extend(groups[name])
        else:
            out.add(name)
    return out


class _Seccomp:
    """The few libseccomp calls needed, through ctypes."""

    def __init__(self) -> None:
        path = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
        lib = ctypes.CDLL(path, use_errno=True)
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_rule_add_array.argtypes = [
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.POINTER(_ArgCmp),
        ]
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_load.argtypes = [ctypes.c_void_p]
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        self.lib = lib

    def nr(self, name: str) -> int:
        """Syscall number on the native ABI, or a negative value when it has none."""
        return int(self.lib.seccomp_syscall_resolve_name(name.encode()))

    def load(
        self, default: int, rules: list[tuple[int, int, list[tuple[int, int, int, int]]]]
    ) -> None:
        """Build one filter (default action + rules) and attach it to this process."""
        ctx = self.lib.seccomp_init(default)
        if not ctx:
            raise OSError("seccomp_init failed")
        try:
            for action, nr, cmps in rules:
                arr = (_ArgCmp * max(1, len(cmps)))(*(_ArgCmp(*c) for c in cmps))
                rc = self.lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr)
                if rc < 0:
                    raise OSError(-rc, f"seccomp_rule_add_array({nr}) failed")
            rc = self.lib.seccomp_load(ctx)
            if rc < 0:
                raise OSError(-rc, "seccomp_load failed")
        finally:
            self.lib.seccomp_release(ctx)


def apply(box: UnitSandbox) -> None:
    """Attach the unit's filters to the current process (irreversible; exec afterwards)."""
    sc = _Seccomp()
    eperm = scmp_act_errno(getattr(errno, box.errno_name))
    if box.deny_write_execute:
        wx = mmap.PROT_WRITE | mmap.PROT_EXEC
        x = mmap.PROT_EXEC
        mdwe = [
            (scmp_act_errno(errno.EPERM), sc.nr("mmap"), [(2, SCMP_CMP_MASKED_EQ, wx, wx)]),
            (scmp_act_errno(errno.EPERM), sc.nr("mprotect"), [(2, SCMP_CMP_MASKED_EQ, x, x)]),
            (scmp_act_errno(errno.EPERM), sc.nr("pkey_mprotect"), [(2, SCMP_CMP_MASKED_EQ, x, x)]),
            (
                scmp_act_errno(errno.EPERM),
                sc.nr("shmat"),
                [(2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC)],
            ),
        ]
        sc.load(SCMP_ACT_ALLOW, mdwe)
    if box.families is not None:
        allowed = {int(getattr(socket, f)) for f in box.families}
        sock = sc.nr("socket")
        noaf = scmp_act_errno(errno.EAFNOSUPPORT)
        af_rules = [
            (noaf, sock, [(0, SCMP_CMP_EQ, af, 0)]) for af in range(AF_MAX) if af not in allowed
        ]
        af_rules.append((noaf, sock, [(0, SCMP_CMP_GE, AF_MAX, 0)]))
        sc.load(SCMP_ACT_ALLOW, af_rules)

    # Last: the allow-list forbids seccomp() itself, so the other filters go in first.
    if box.allow is not None:
        known = expand(["@known"], box._groups)
        rules: list[tuple[int, int, list[tuple[int, int, int, int]]]] = []
        for name in sorted(known):
            nr = sc.nr(name)
            if nr < 0:
                continue
            rules.append((SCMP_ACT_ALLOW if name in box.allow else eperm, nr, []))
        sc.load(scmp_act_errno(errno.ENOSYS), rules)


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.support.sandbox --unit FILE [--mdwe yes|no] -- COMMAND...``."""
    parser = argparse.ArgumentParser(prog="tests.support.sandbox", description=__doc__)
    parser.add_argument("--unit", type=Path, required=True, help="systemd unit file")
    parser.add_argument(
        "--mdwe",
        choices=("unit", "yes", "no"),
        default="unit",
        help="override MemoryDenyWriteExecute= (default: as the unit says)",
    )
    parser.add_argument("command", nargs="+")
    args = parser.parse_args(argv)
    box = parse_unit(args.unit.read_text(encoding="utf-8"))
    if args.mdwe != "unit":
        box.deny_write_execute = args.mdwe == "yes"
    apply(box)
    os.execvp(args.command[0], args.command)  # noqa: S606


if __name__ == "__main__":
    sys.exit(main())
