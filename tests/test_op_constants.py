"""graphs/op.py is the one Python home of fastv::TokenSelect's constants and integer rules; the C++
plugin keeps its own copies. This reads them out of the plugin's sources (regexes, no compiler) and
checks that they equal op.py, then checks op.py's rules against the PyTorch reference and docs/design.md §2's
examples. (The compiled C++ keep rule and hash are compared with op.py in tests/test_plugin_math.py.)"""
from __future__ import annotations

import ast
import operator
import re
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from fastv_export.config import FastVConfig
from fastv_export.errors import FastVError
from fastv_export.graphs import op
from fastv_export.reference import selection

ROOT = Path(__file__).resolve().parents[1]
MATH_H = ROOT / "plugins" / "include" / "fastv" / "token_select_math.h"
PLUGIN_H = ROOT / "plugins" / "src" / "token_select_plugin.h"
HOST_CPP = ROOT / "plugins" / "src" / "token_select_host.cpp"
CMAKE = ROOT / "plugins" / "CMakeLists.txt"


# ---------------------------------------------------------------------------------------------- C++ parsing
def _source(path: Path) -> str:
    """The file without // and /* */ comments (so that a comment never counts as code)."""
    text = path.read_text()
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


_BINOPS = {ast.LShift: operator.lshift, ast.RShift: operator.rshift, ast.Mult: operator.mul,
           ast.Add: operator.add, ast.Sub: operator.sub, ast.Pow: operator.pow}


def cpp_int(expr: str) -> int:
    """Value of a constant C++ integer expression made of literals, (), <<, >>, *, +, - and
    ``int64_t{x}`` / ``static_cast<...>(x)`` wrappers."""
    e = re.sub(r"\b(?:u?int(?:8|16|32|64)_t|size_t)\s*\{([^{}]*)\}", r"(\1)", expr.strip())
    e = re.sub(r"static_cast<[^<>]*>", "", e)
    e = re.sub(r"\b(0[xX][0-9a-fA-F]+|\d+)(?:[uU]?[lL]{0,2}|[lL]{1,2}[uU])\b", r"\1", e).replace("'", "")

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        raise ValueError(f"not a constant integer expression: {expr!r}")

    return ev(ast.parse(e, mode="eval"))


def cpp_constexpr(text: str, name: str, path: Path) -> str:
    """The initialiser of ``constexpr <type> name = ...;``."""
    found = re.findall(rf"\bconstexpr\s+[\w:\s\*]+?\b{name}\s*=\s*([^;]+);", text)
    assert len(found) == 1, f"{path.relative_to(ROOT)}: expected one 'constexpr ... {name} = ...;', found {found}"
    return found[0].strip()


def cpp_function_body(text: str, name: str, path: Path) -> str:
    m = re.search(rf"\b{name}\s*\([^)]*\)\s*\{{", text)
    assert m, f"{path.relative_to(ROOT)}: function {name}(...) not found"
    depth, i = 1, m.end()
    while depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[m.end():i - 1]


# ---------------------------------------------------------------------------------------------- C++ == op.py
@pytest.mark.parametrize("cpp_name,py_name", [
    ("kHashPrime", "HASH_PRIME"), ("kHashA", "HASH_A"), ("kHashB", "HASH_B"), ("kHashC", "HASH_C"),
    ("kHashD", "HASH_D"), ("kSeedLimit", "SEED_LIMIT")])
def test_hash_constants_match(cpp_name, py_name):
    text = _source(MATH_H)
    value = cpp_int(cpp_constexpr(text, cpp_name, MATH_H))
    want = getattr(op, py_name)
    assert value == want, (f"{MATH_H.relative_to(ROOT)}: {cpp_name} = {value} but graphs/op.py: "
                           f"{py_name} = {want}")


def test_random_score_shift_and_scale_match():
    text = _source(MATH_H)
    body = cpp_function_body(text, "random_score", MATH_H)
    where = f"{MATH_H.relative_to(ROOT)}: random_score()"
    m = re.search(r"random_hash\s*\([^()]*\)\s*(>>|/)\s*(\w+)", body)
    assert m, f"{where}: no 'random_hash(...) >> k' or 'random_hash(...) / d' found in:\n{body}"
    k = cpp_int(m.group(2))
    divisor = 1 << k if m.group(1) == ">>" else k
    assert divisor == op.HASH_SHIFT, (f"{where} divides the hash by {divisor} ('{m.group(0)}') but graphs/op.py: "
                                      f"HASH_SHIFT = {op.HASH_SHIFT}")
    scales = [float(s.rstrip("fF")) for s in re.findall(r"\*\s*([0-9.]+(?:[eE][-+]?\d+)?[fF]?)", body)]
    assert len(scales) == 1, f"{where}: expected one '* <float literal>' scale, found {scales}"
    assert scales[0] == op.RANDOM_SCORE_SCALE, (f"{where} scales by {scales[0]!r} but graphs/op.py: "
                                                f"RANDOM_SCORE_SCALE = {op.RANDOM_SCORE_SCALE!r}")


@pytest.mark.parametrize("cpp_name,py_name", [
    ("kPluginName", "PLUGIN_NAME"), ("kPluginVersion", "PLUGIN_VERSION"), ("kPluginNamespace", "PLUGIN_NAMESPACE")])
def test_plugin_identity_matches(cpp_name, py_name):
    init = cpp_constexpr(_source(PLUGIN_H), cpp_name, PLUGIN_H)
    m = re.fullmatch(r'"([^"\\]*)"', init)
    assert m, f"{PLUGIN_H.relative_to(ROOT)}: {cpp_name} is not a plain string literal: {init}"
    want = getattr(op, py_name)
    assert m.group(1) == want, (f"{PLUGIN_H.relative_to(ROOT)}: {cpp_name} = {m.group(1)!r} but graphs/op.py: "
                                f"{py_name} = {want!r}")


def test_ratio_den_limit_matches():
    text = _source(HOST_CPP)
    # comparisons of ratio_den with something other than 0 or ratio_num: the upper limit
    operand = r"(\((?:[^()]|\([^()]*\))*\)|[\w{}]+)"
    checks = [(cmp, rhs) for cmp, rhs in re.findall(rf"\bratio_den\s*(<=|>=|<|>)\s*{operand}", text)
              if rhs.strip() != "0" and "ratio_num" not in rhs]
    where = f"{HOST_CPP.relative_to(ROOT)}: the ratio_den limit"
    assert len(checks) == 1, f"{where}: expected one 'ratio_den > LIMIT' check, found {checks}"
    cmp, rhs = checks[0]
    value = cpp_int(rhs)
    limit = value if cmp in (">", "<=") else value - 1      # largest accepted ratio_den
    assert limit == op.RATIO_DEN_LIMIT, (f"{where} accepts ratio_den up to {limit} ('ratio_den {cmp} {rhs}') but "
                                         f"graphs/op.py: RATIO_DEN_LIMIT = {op.RATIO_DEN_LIMIT}")


def test_ranking_names_match():
    body = cpp_function_body(_source(HOST_CPP), "ranking_from_name", HOST_CPP)
    names = re.findall(r'name\s*==\s*"(\w+)"', body)
    assert sorted(names) == sorted(op.RANKINGS), (f"{HOST_CPP.relative_to(ROOT)}: ranking_from_name() knows "
                                                  f"{names} but graphs/op.py: RANKINGS = {op.RANKINGS}")


def test_plugin_library_name_matches():
    text = re.sub(r"#[^\n]*", "", CMAKE.read_text())
    where = CMAKE.relative_to(ROOT)
    targets = [name for name, srcs in re.findall(r"add_library\(\s*(\w+)\s+SHARED\b([^)]*)\)", text)
               if "token_select_plugin.cpp" in srcs]
    assert len(targets) == 1, f"{where}: expected one SHARED library built from token_select_plugin.cpp, got {targets}"
    target = targets[0]
    output_name = target
    for props in re.findall(rf"set_target_properties\(\s*{target}\s+PROPERTIES\b([^)]*)\)", text):
        m = re.search(r"\bOUTPUT_NAME\s+\"?([\w.-]+)\"?", props)
        if m:
            output_name = m.group(1)
    library = f"lib{output_name}.so"
    assert library == op.PLUGIN_LIBRARY, (f"{where}: target {target} builds {library} but graphs/op.py: "
                                          f"PLUGIN_LIBRARY = {op.PLUGIN_LIBRARY!r}")


def test_cpp_int_parser():
    assert cpp_int("int64_t{1} << 31") == 2**31 == cpp_int("(int64_t{1} << 31)") == cpp_int("2147483648LL")
    assert cpp_int("1u << 7") == 128 and cpp_int("0x7FFFFFFF") == 2**31 - 1
    with pytest.raises(ValueError):
        cpp_int("kSomething + 1")


# ---------------------------------------------------------------------------------------------- op.py rules
def test_identity_is_consistent():
    assert op.PLUGIN_IDENTITY == {"name": op.PLUGIN_NAME, "version": op.PLUGIN_VERSION,
                                  "namespace": op.PLUGIN_NAMESPACE, "onnx_domain": op.OP_DOMAIN,
                                  "library": op.PLUGIN_LIBRARY}
    assert (op.OP_DOMAIN, op.OP_TYPE, op.PLUGIN_NAME) == ("fastv", "TokenSelect", "TokenSelect")


@pytest.mark.parametrize("seed", [0, 1, 7, 12345, 2**30 + 7, 2**31 - 1])
def test_random_score_int_matches_reference_bit_exact(seed):
    g = torch.Generator().manual_seed(seed % 1009)
    positions = torch.cat([torch.arange(0, 600), torch.randint(0, 2**31 - 1, (400,), generator=g),
                           torch.tensor([2**31 - 2, 2**31 - 1])])
    got = selection.random_scores(positions, seed)
    want = torch.tensor([op.random_score_int(p, seed) * op.RANDOM_SCORE_SCALE for p in positions.tolist()],
                        dtype=torch.float32)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert all(0 <= op.random_score_int(p, seed) < 2**24 for p in positions[:100].tolist())


def test_random_scores_reject_seeds_outside_the_limit():
    for seed in (-1, op.SEED_LIMIT):
        with pytest.raises(ValueError, match="seed"):
            selection.random_scores(torch.arange(4), seed)


def test_keep_count_design_examples():
    assert op.keep_count(576, 2, 3) == 192           # docs/design.md §2: a float ceil(576 * (1 - 2/3)) gives 193
    assert op.keep_count(64, 9, 10) == 7
    for n in (0, 5, 64, 100):
        assert op.keep_count(64, 9, 10, keep=n) == min(n, 64)
    assert op.keep_count(0, 1, 2) == 0
    assert op.kept_length(100, 64, 9, 10) == 100 - 64 + 7
    assert op.kept_length(100, 64, 1, 2, keep=80) == 100


def test_config_keep_count_delegates_to_op():
    for m in (0, 1, 63, 64, 576, 577):
        for r in ("2/3", "9/10", "1/2", 0, "575/576"):
            cfg = FastVConfig(ratio=r)
            assert cfg.keep_count(m) == op.keep_count(m, cfg.r.numerator, cfg.r.denominator)
    assert FastVConfig(keep=5).keep_count(64) == 5
    with pytest.raises(FastVError, match="keep=65 is more than the 64 image tokens"):
        FastVConfig(keep=65).keep_count(64)


def test_check_attributes():
    good = dict(ranking="last", ratio_num=1, ratio_den=2, keep=-1, seed=0)
    op.check_attributes(**good)
    op.check_attributes(**good | dict(ratio_num=op.RATIO_DEN_LIMIT - 1, ratio_den=op.RATIO_DEN_LIMIT))
    for bad in (dict(ranking="top"), dict(ratio_den=0), dict(ratio_den=op.RATIO_DEN_LIMIT + 1),
                dict(ratio_num=2), dict(ratio_num=-1), dict(keep=-2), dict(seed=-1), dict(seed=op.SEED_LIMIT),
                dict(keep=True), dict(seed=1.0)):
        with pytest.raises(ValueError):
            op.check_attributes(**good | bad)


def test_config_rejects_denominators_beyond_the_plugin_limit():
    assert FastVConfig(ratio=Fraction(1, op.RATIO_DEN_LIMIT)).r.denominator == op.RATIO_DEN_LIMIT
    # the REDUCED denominator counts: 2/(2L+2) = 1/(L+1) is refused, 2^20/2^33 = 1/2^13 is fine
    for ratio in (Fraction(1, op.RATIO_DEN_LIMIT + 1), Fraction(2, 2 * op.RATIO_DEN_LIMIT + 2),
                  0.12345678901234, "123456789/9876543211"):
        with pytest.raises(FastVError, match=r"denominator .* exceeds 2\^31.*smaller denominator"):
            FastVConfig(ratio=ratio)
    # a ratio whose unreduced denominator is too large but whose reduced one fits is fine
    assert FastVConfig(ratio=f"{2**20}/{2**33}").r == Fraction(1, 2**13)
