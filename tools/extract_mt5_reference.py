"""Extract the surface of the real ``MetaTrader5`` package into ``mt5_reference.json``.

Run it again when MetaQuotes publishes a new wheel, then run ``tests/test_mt5_fidelity.py``:
every difference between the new package and the simulator shows up as a failure.

    python tools/extract_mt5_reference.py [--version 5.0.6231] [--wheel PATH]

The wheel is Windows-only (its ``_core`` module is a PE DLL that cannot be imported here), so
the script reads it as data:

* ``MetaTrader5/__init__.py``: ``__version__``, ``__author__``, every module constant (with
  its value) and the pure-Python helpers (``Buy``, ``Sell``, ``Close``) with their parameters;
* ``_core.*.pyd``: the ``PyMethodDef`` table (name, ``METH_*`` flags, docstring) and the
  ``PyStructSequence_Desc`` tables (record type name, docstring, field names in order), found
  by following pointers through the PE sections;
* a few facts read off the disassembly by hand (``ARGUMENT_FORMATS``, ``LAST_ERROR_DEFAULTS``,
  ``STRING_ARGUMENT_MAX_CHARS``, ``REQUEST_FIELDS``): each is checked against the binary
  (its strings must be there) so a new wheel that changes them fails loudly here.

Only the JSON is kept in the repository, never the wheel or its DLL.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

DEFAULT_VERSION = "5.0.6231"
OUTPUT = Path(__file__).resolve().parent.parent / "actors" / "mt5" / "reference" / (
    "mt5_reference.json")

METH_VARARGS = 0x1
METH_KEYWORDS = 0x2
METH_NOARGS = 0x4
METH_O = 0x8

# Read off the disassembly of 5.0.6231 (objdump -d). For METH_VARARGS functions: the
# positional counts accepted (another count: None and (-2, 'Invalid arguments'), no
# exception) and the per-argument parsing: "str" = a str shorter than
# STRING_ARGUMENT_MAX_CHARS + 1 else -2; "date" = int, float or datetime (.timestamp()) else
# -2; "i"/"k"/"d"/"p" = PyArg_ParseTuple codes, whose TypeError is left set while the function
# returns None, so Python raises SystemError; "O" = anything.
ARGUMENT_FORMATS: dict[str, dict[str, Any]] = {
    "copy_ticks_from": {"counts": [4], "args": ["str", "date", "i", "i"], "format": "OOii"},
    "copy_ticks_range": {"counts": [4], "args": ["str", "date", "date", "i"], "format": "OOOi"},
    "copy_rates_from": {"counts": [4], "args": ["str", "i", "date", "i"], "format": "OiOi"},
    "copy_rates_from_pos": {"counts": [4], "args": ["str", "i", "i", "i"], "format": "Oiii"},
    "copy_rates_range": {"counts": [4], "args": ["str", "i", "date", "date"], "format": "OiOO"},
    "history_orders_total": {"counts": [2], "args": ["date", "date"], "format": None},
    "history_deals_total": {"counts": [2], "args": ["date", "date"], "format": None},
    "order_calc_margin": {"counts": [4], "args": ["k", "str", "d", "d"], "format": "kOdd"},
    "order_calc_profit": {"counts": [5], "args": ["k", "str", "d", "d", "d"],
                          "format": "kOddd"},
    "symbol_info": {"counts": [1], "args": ["str"], "format": None},
    "symbol_info_tick": {"counts": [1], "args": ["str"], "format": None},
    "symbol_select": {"counts": [1, 2], "args": ["str", "p"], "format": "Op"},
    "market_book_add": {"counts": [1], "args": ["str"], "format": None},
    "market_book_release": {"counts": [1], "args": ["str"], "format": None},
    "market_book_get": {"counts": [1], "args": ["str"], "format": None},
}

# METH_VARARGS|METH_KEYWORDS functions parse their keywords by name (PyDict_GetItemString:
# unknown keywords are ignored) and refuse bad values with these -2 messages.
KEYWORD_ARGUMENTS: dict[str, dict[str, Any]] = {
    "initialize": {"max_positional": 1, "keywords": ["login", "server", "password", "timeout",
                                                     "path", "portable"]},
    # The 2nd and 3rd positional arguments land in the password and server buffers (the
    # docstring says server first; the code and the MQL5 docs say password first).
    "login": {"max_positional": 3, "positional": ["login", "password", "server"],
              "keywords": ["login", "server", "password", "timeout"]},
    "positions_get": {"max_positional": 0, "keywords": ["ticket", "symbol", "group"]},
    "orders_get": {"max_positional": 0, "keywords": ["ticket", "symbol", "group"]},
    "history_orders_get": {"max_positional": 2, "keywords": ["group", "ticket", "position"]},
    "history_deals_get": {"max_positional": 2, "keywords": ["group", "ticket", "position"]},
    "order_check": {"max_positional": 1, "keywords": "the request's fields"},
    "order_send": {"max_positional": 1, "keywords": "the request's fields"},
    "symbols_get": {"max_positional": 1, "keywords": ["group"]},
}

# The error setter maps a code to its default message (a jump table for -10005..-10000, a
# chain of compares for -7..-2, 'Terminal: Call failed' for anything else). -10003 appends
# the reason ('IPC initialize failed, %S'); -8 has no default of its own: order_send sets
# 'Auto-Trading using Python API disabled in Terminal' explicitly.
LAST_ERROR_DEFAULTS: dict[int, str] = {
    1: "Success",
    -1: "Terminal: Call failed",
    -2: "Terminal: Invalid params",
    -3: "Terminal: Out of memory",
    -4: "Terminal: Not found",
    -5: "Terminal: Incompatible versions, please install the latest version of Terminal "
        "and Python module",
    -6: "Terminal: Authorization failed",
    -7: "Terminal: Unsupported function",
    -8: "Terminal: Call failed",
    -10000: "IPC call failed",
    -10001: "IPC send failed",
    -10002: "IPC recv failed",
    -10003: "IPC initialize failed, %S",
    -10004: "No IPC connection",
    -10005: "IPC timeout",
}
# Before any call the error variables are zero and empty; each function starts by setting
# (1, 'Success') (a movabs of 'Success' into the message buffer).
LAST_ERROR_INITIAL = [0, ""]

# Symbol names and request comments go through PyUnicode_AsWideChar(obj, NULL, 0), whose
# count includes the terminating NUL, compared with `cmp $0x1f; jae fail`: at most 29 chars.
STRING_ARGUMENT_MAX_CHARS = 29
# login/initialize server and password: the same count compared with 0xff.
CREDENTIAL_MAX_CHARS = 254

# order_send/order_check read these keys of the request dict, in this order (the first bad
# one is named in the error); missing keys stay zero, unknown keys are ignored. "uint"
# fields take an int (a negative one leaves OverflowError set: SystemError); "float" fields
# take a float only (an int is refused); "str" as above.
REQUEST_FIELDS: list[list[str]] = [
    ["action", "uint"], ["magic", "uint"], ["order", "uint"], ["symbol", "str"],
    ["volume", "float"], ["price", "float"], ["stoplimit", "float"], ["sl", "float"],
    ["tp", "float"], ["deviation", "uint"], ["type", "uint"], ["type_filling", "uint"],
    ["type_time", "uint"], ["expiration", "int"], ["comment", "str"], ["position", "uint"],
    ["position_by", "uint"],
]


def download_wheel(version: str, directory: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--platform", "win_amd64", "--python-version", "3.11", f"MetaTrader5=={version}",
         "-d", str(directory)],
        check=True,
    )
    return next(directory.glob("*.whl"))


class PeImage:
    """Just enough of a PE32+ reader to follow pointers between sections."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        pe = struct.unpack_from("<I", data, 0x3C)[0]
        sections = struct.unpack_from("<H", data, pe + 6)[0]
        optional_size = struct.unpack_from("<H", data, pe + 20)[0]
        optional = pe + 24
        self.base = struct.unpack_from("<Q", data, optional + 24)[0]
        self.sections: list[tuple[str, int, int, int, int]] = []
        for i in range(sections):
            o = optional + optional_size + 40 * i
            name = data[o:o + 8].rstrip(b"\0").decode()
            vsize, vaddr, rsize, raw = struct.unpack_from("<IIII", data, o + 8)
            self.sections.append((name, vaddr, vsize, raw, rsize))

    def offset(self, address: int) -> int | None:
        rva = address - self.base
        for _name, vaddr, vsize, raw, rsize in self.sections:
            if vaddr <= rva < vaddr + max(vsize, rsize):
                return raw + rva - vaddr
        return None

    def string(self, address: int) -> str | None:
        o = self.offset(address) if address else None
        if o is None:
            return None
        end = self.data.find(b"\0", o)
        raw = self.data[o:end]
        if not raw or not all(32 <= c < 127 or c in (9, 10) for c in raw):
            return None
        return raw.decode("ascii")

    def qword(self, address: int) -> int:
        o = self.offset(address)
        return 0 if o is None else struct.unpack_from("<Q", self.data, o)[0]

    def data_words(self) -> list[int]:
        """Addresses of every 8-aligned slot of .data and .rdata."""
        slots = []
        for name, vaddr, _vsize, _raw, rsize in self.sections:
            if name in (".data", ".rdata"):
                slots += [self.base + vaddr + o for o in range(0, rsize - 32, 8)]
        return slots


def method_table(image: PeImage) -> list[dict[str, Any]]:
    """The module's PyMethodDef array: the longest run of {name, meth, flags, doc}."""
    best: list[dict[str, Any]] = []
    for start in image.data_words():
        run: list[dict[str, Any]] = []
        slot = start
        while True:
            name, meth, flags, doc = (image.qword(slot + 8 * k) for k in range(4))
            text = image.string(name)
            if not (text and text.isidentifier() and meth and flags < 0x100):
                break
            run.append({"name": text, "flags": flags, "doc": image.string(doc)})
            slot += 32
        if len(run) > len(best):
            best = run
    return best


def record_types(image: PeImage) -> list[dict[str, Any]]:
    """Every PyStructSequence_Desc: {name, doc, fields, n_in_sequence}."""
    found = []
    for slot in image.data_words():
        name, doc, fields, count = (image.qword(slot + 8 * k) for k in range(4))
        text = image.string(name)
        if not (text and text.isidentifier() and image.string(doc)
                and image.offset(fields) is not None and 0 < count < 256):
            continue
        names = []
        entry = fields
        while image.qword(entry):
            field = image.string(image.qword(entry))
            if field is None:
                break
            names.append(field)
            entry += 16
        else:
            if len(names) == count:
                found.append({"name": text, "doc": image.string(doc), "fields": names,
                              "n_in_sequence": count})
    return found


def convention(flags: int) -> str:
    if flags & METH_NOARGS:
        return "noargs"
    if flags & METH_O:
        return "one"
    if flags & METH_KEYWORDS:
        return "varargs_keywords"
    return "varargs"


def module_constants(source: str) -> tuple[dict[str, Any], dict[str, int]]:
    """``__version__``/``__author__`` and the constants (evaluated) of ``__init__.py``."""
    dunders: dict[str, Any] = {}
    constants: dict[str, int] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            value = eval(compile(ast.Expression(node.value), "<const>", "eval"), {})  # noqa: S307
            if name.startswith("__"):
                dunders[name] = value
            else:
                constants[name] = value
    return dunders, constants


def helpers(source: str) -> list[dict[str, Any]]:
    """The public functions written in Python in ``__init__.py``, with their parameters."""
    found = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            args = node.args
            positional = [a.arg for a in args.posonlyargs + args.args]
            defaults = [None] * (len(positional) - len(args.defaults)) + [
                ast.literal_eval(d) for d in args.defaults]
            params = [{"name": n, "kind": "positional_or_keyword",
                       "default": d, "required": i < len(positional) - len(args.defaults)}
                      for i, (n, d) in enumerate(zip(positional, defaults, strict=True))]
            for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True):
                params.append({"name": a.arg, "kind": "keyword_only",
                               "default": None if d is None else ast.literal_eval(d),
                               "required": d is None})
            found.append({"name": node.name, "parameters": params})
    return found


def check_strings(image: PeImage, strings: list[str]) -> None:
    """Hand-read facts must still match the binary: their strings must be in it."""
    for text in strings:
        needle = text.split("%")[0].encode()
        if needle not in image.data:
            raise SystemExit(f"the binary no longer contains {text!r}: re-read the disassembly")


def extract(wheel: Path) -> dict[str, Any]:
    with zipfile.ZipFile(wheel) as archive:
        source = archive.read("MetaTrader5/__init__.py").decode()
        core_name = next(n for n in archive.namelist() if n.startswith("MetaTrader5/_core"))
        image = PeImage(archive.read(core_name))
    dunders, constants = module_constants(source)
    methods = method_table(image)
    records = record_types(image)
    check_strings(image, [m for c, m in LAST_ERROR_DEFAULTS.items() if c != 1] + [
        f'Invalid "{field}" argument' for field, _kind in REQUEST_FIELDS] + [
        "Invalid arguments", "Unnamed arguments not allowed", "Invalid number of arguments",
        "Auto-Trading using Python API disabled in Terminal", "_asdict"])
    for name, spec in ARGUMENT_FORMATS.items():
        if spec["format"] and spec["format"].encode() + b"\0" not in image.data:
            raise SystemExit(f"format {spec['format']!r} of {name} not found")
    # The record types get one extra method, _asdict (METH_NOARGS), and nothing else.
    return {
        "package": "MetaTrader5",
        "wheel": wheel.name,
        "wheel_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
        "version": dunders["__version__"],
        "author": dunders["__author__"],
        "functions": [
            {"name": m["name"], "flags": m["flags"], "convention": convention(m["flags"]),
             "doc": m["doc"],
             "positional": ARGUMENT_FORMATS.get(m["name"]),
             "keywords": KEYWORD_ARGUMENTS.get(m["name"])}
            for m in methods
        ],
        "helpers": helpers(source),
        "constants": constants,
        "record_types": records,
        "record_methods": ["_asdict"],
        "last_error": {
            "initial": LAST_ERROR_INITIAL,
            "defaults": {str(code): message for code, message in LAST_ERROR_DEFAULTS.items()},
        },
        "argument_messages": sorted(
            s for s in image.data.split(b"\0")
            if s.startswith(b"Invalid ") or s.startswith(b"Unnamed ")
            for s in [s.decode("ascii", "replace")]),
        "string_argument_max_chars": STRING_ARGUMENT_MAX_CHARS,
        "credential_max_chars": CREDENTIAL_MAX_CHARS,
        "request_fields": REQUEST_FIELDS,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default=DEFAULT_VERSION)
    parser.add_argument("--wheel", type=Path, help="use this wheel instead of downloading")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        wheel = options.wheel or download_wheel(options.version, Path(scratch))
        reference = extract(wheel)
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(json.dumps(reference, indent=1) + "\n")
    print(f"{options.output}: {len(reference['functions'])} functions, "
          f"{len(reference['constants'])} constants, "
          f"{len(reference['record_types'])} record types, "
          f"{len(reference['helpers'])} helpers")


if __name__ == "__main__":
    main()
