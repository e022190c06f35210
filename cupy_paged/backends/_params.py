"""Kernel interfaces: each kernel's parameters are described once, as a struct in a
``cuda_src/<kernel>/params.cuh`` header that the kernel body reads; this module parses that
definition into its NumPy mirror (``ParamsStruct``) and generates every ``extern "C"`` entry
point the same way (``entry_point``). A launch (``_launch.DirectLaunch``) packs the scalars into
the mirror once per plan and writes the call's device pointers into its leading pointer fields.

Header format: ``struct Name {`` then one field per line, ``type name;`` (a trailing ``//``
comment allowed), pointer fields first; types are pointers, ``int``, ``unsigned``, ``float``
and ``long long``.

The entry takes the pointer fields as separate parameters and the scalars as one struct
``NameScalars`` by value, and assembles the kernel's ``Name`` from them: the parameter bytes are
then exactly the mirror's (pointers at 8-byte steps, the scalars after them at the struct's own
offsets), so one host buffer serves both. One struct parameter holding the pointers too made
ptxas spill more in the prefill forward kernel, which sits at the 255-register limit
(benchmarks/NOTES.md, session 6). The generated entry ``static_assert``s both sizes, so a
mirror that differs from the compiler's layout fails to compile.
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

    def __init__(self, cname, fields, declared=None):
        self.cname = cname
        self.fields = tuple(fields)
        self.declared = tuple(declared or (c for c, _ in self.fields))  # C types as written
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
        self.scalars_dtype = np.dtype([(n, _NUMPY_OF_C[c]) for c, n in self.scalars],
                                      align=True)
        self.scalars_cname = cname.replace("::", "_") + "_Scalars"

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

    @property
    def scalars_definition(self):
        """The entry's ``NameScalars`` struct (the scalar fields in order) and its size check;
        empty when the struct has no scalars."""
        if not self.scalars:
            return ""
        name = self.scalars_cname
        return (f"struct {name} {{\n" + "".join(f"  {c} {n};\n" for c, n in self.scalars)
                + f"}};\nstatic_assert(sizeof({name}) == {self.scalars_dtype.itemsize}, "
                f"\"{name}: the NumPy mirror's layout differs\");\n")

    @property
    def parameters(self):
        """The entry's parameter list: each pointer field, then the scalars struct."""
        pointers = [f"{c} {n}" for c, (_, n) in zip(self.declared, self.fields)
                    if n in self.pointers]
        return ", ".join(pointers + ([f"const {self.scalars_cname} s"] if self.scalars else []))

    @property
    def assembled(self):
        """C++ that declares ``p``, the struct, from the entry's parameters."""
        values = list(self.pointers) + [f"s.{n}" for _, n in self.scalars]
        return f"const {self.cname} p{{{', '.join(values)}}};"


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
    fields, declared = [], []
    for line in match.group("body").splitlines():
        if not line.strip():
            continue
        field = _FIELD.match(line)
        if field is None:
            raise ValueError(f"{header}: {short}: cannot read the field line {line.strip()!r} "
                             "(one 'type name;' per line)")
        written = re.sub(r"\s+", " ", field["type"]).strip().replace(" *", "*")
        fields.append((written.replace("const ", ""), field["name"]))
        declared.append(written)
    return ParamsStruct(cname, fields, declared)


def entry_point(name, params, call, threads, min_blocks=None):
    """``extern "C" __global__ void name(pointers..., const NameScalars s) { p = ...; call }``
    with ``threads`` as the launch bound (and ``min_blocks`` resident blocks per SM asked of
    the register allocator), after the size checks. ``call`` reads the struct as ``p``."""
    bounds = threads if min_blocks is None else f"{threads}, {min_blocks}"
    return (params.size_check + params.scalars_definition +
            f'extern "C" __global__ void __launch_bounds__({bounds})\n'
            f"{name}({params.parameters}) {{\n  {params.assembled}\n  {call}\n}}\n")
