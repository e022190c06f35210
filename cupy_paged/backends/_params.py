"""Kernel interfaces: each kernel takes one parameter struct by value, defined once in a
``cuda_src/<kernel>/params.cuh`` header; this module parses that definition into its NumPy
mirror (``ParamsStruct``) and generates every ``extern "C"`` entry point the same way
(``entry_point``). A launch (``_launch.DirectLaunch``) packs the scalars into the mirror once per
plan and writes the call's device pointers into its leading pointer fields.

Header format: ``struct Name {`` then one field per line, ``type name;`` (a trailing ``//``
comment allowed), pointer fields first; types are pointers, ``int``, ``unsigned``, ``float``
and ``long long``. The generated entry ``static_assert``s the struct's size, so a mirror that
differs from the compiler's layout fails to compile.
"""
from __future__ import annotations

import functools
import re

import numpy as np

_NUMPY_OF_C = {"int": "<i4", "unsigned": "<u4", "float": "<f4", "long long": "<i8"}
_FIELD = re.compile(r"^\s*(?P<type>[A-Za-z_][\w ]*?\s*\**)\s*(?P<name>[A-Za-z_]\w*);\s*$")
_COMMENT = re.compile(r"//.*$", re.MULTILINE)


class ParamsStruct:
    """The NumPy mirror of one kernel's parameter struct.

    cname: the C++ type (e.g. ``cupy_paged::flash::FwdParams``); pointers: names of its
    pointer fields, in order (they lead the struct); scalars: ((C type, name), ...) of the rest;
    dtype: the aligned NumPy structured dtype (pointers as uint64), C's layout.
    """

    def __init__(self, cname, fields):
        self.cname = cname
        self.fields = tuple(fields)
        kinds = ["pointer" if c.endswith("*") else c for c, _ in self.fields]
        self.pointers = tuple(n for (c, n), k in zip(self.fields, kinds) if k == "pointer")
        if any(k == "pointer" for k in kinds[len(self.pointers):]):
            raise ValueError(f"{cname}: pointer fields must come first")
        self.scalars = tuple((c, n) for (c, n), k in zip(self.fields, kinds) if k != "pointer")
        for c, n in self.scalars:
            if c not in _NUMPY_OF_C:
                raise ValueError(f"{cname}.{n}: unsupported field type {c!r} "
                                 f"(pointers, {', '.join(_NUMPY_OF_C)})")
        self.dtype = np.dtype([(n, "<u8" if k == "pointer" else _NUMPY_OF_C[k])
                               for (_, n), k in zip(self.fields, kinds)], align=True)

    def pack(self, **values):
        """The (1,) structured array with the scalars ``values`` (every scalar field, by
        name) and null pointers; ValueError naming a missing or unknown field."""
        names = {n for _, n in self.scalars}
        missing, unknown = names - set(values), set(values) - names
        if missing or unknown:
            raise ValueError(f"{self.cname}: missing {sorted(missing)}, unknown "
                             f"{sorted(unknown)}")
        packed = np.zeros(1, dtype=self.dtype)
        for name, value in values.items():
            packed[name] = value
        return packed

    @property
    def size_check(self):
        """C++ that fails to compile when the mirror's size differs from the struct's."""
        return (f"static_assert(sizeof({self.cname}) == {self.dtype.itemsize}, "
                f"\"{self.cname}: the NumPy mirror's layout differs\");\n")


@functools.cache
def params_struct(header, cname):
    """The ``ParamsStruct`` of ``cname`` (qualified, e.g. ``cupy_paged::guard::GuardParams``)
    as defined in ``header`` (relative to cuda_src, e.g. ``guard/params.cuh``)."""
    from ..jit.toolchain import source_dir

    text = _COMMENT.sub("", (source_dir() / header).read_text())
    short = cname.rsplit("::", 1)[-1]
    match = re.search(r"\bstruct\s+" + short + r"\s*\{(?P<body>.*?)\};", text, re.DOTALL)
    if match is None:
        raise ValueError(f"{header}: no struct {short}")
    fields = []
    for line in match.group("body").splitlines():
        if not line.strip():
            continue
        field = _FIELD.match(line)
        if field is None:
            raise ValueError(f"{header}: {short}: cannot read the field line {line.strip()!r} "
                             "(one 'type name;' per line)")
        ctype = re.sub(r"\s+", " ", field["type"].replace("const ", "")).strip()
        fields.append((ctype.replace(" *", "*"), field["name"]))
    return ParamsStruct(cname, fields)


def entry_point(name, params, call, threads, min_blocks=None):
    """``extern "C" __global__ void name(const Params p) { call }`` with ``threads`` as the
    launch bound (and ``min_blocks`` resident blocks per SM asked of the register allocator),
    after the struct's size check. ``call`` reads the struct as ``p``."""
    bounds = threads if min_blocks is None else f"{threads}, {min_blocks}"
    return (params.size_check +
            f'extern "C" __global__ void __launch_bounds__({bounds})\n'
            f"{name}(const {params.cname} p) {{\n  {call}\n}}\n")
