"""Instructions per pair of the GPU pair loops, counted in their sm_90 SASS (no GPU needed).

    python -m benchmarks.sass_loop                  # both kernels
    python -m benchmarks.sass_loop --kernel triton --config 64:8
    python -m benchmarks.sass_loop --kernel cuda --dump /tmp/cuda.sass

The usual call: float32 inputs, soft teacher, the student gradient only, ratio form (the row path
at k = 1). Triton: the pair kernel compiled for sm_90 through benchmarks.triton_aot (one program
per row, the given BLOCK:warps). CUDA: csrc/kendall_cuda.cu compiled by nvcc into an sm_90 cubin
with the extension's flags (about 40 s), its kernel pair_sums<float, float, RatioPath<float>, soft
teacher, no teacher gradient>. Both are disassembled with the cuobjdump that Triton ships.

The hot loop is found in the SASS itself: of the innermost loops (a backward branch and the code
from its target to it, with no other backward branch inside), those with the most MUFU.RCP, and of
these the shortest: the ratio form's interior loop (the small-spread and direct forms take as many
reciprocals or more, with more instructions; masked loops add predicates). The ratio form takes one
reciprocal per pair and tensor, so pairs per pass = MUFU.RCP / 2 (soft teacher).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from .worker import REPO_ROOT

# Instruction classes, by opcode (the mnemonic before its first dot).
CLASSES = (
    ("FFMA", {"FFMA"}),
    ("FMUL", {"FMUL"}),
    ("FADD", {"FADD"}),
    ("other FP (FSEL, FMNMX, FSETP)", {"FSEL", "FMNMX", "FSETP", "FCHK"}),
    ("MUFU", {"MUFU"}),
    ("conversions", {"F2F", "F2I", "I2F", "FRND", "F2FP", "I2FP", "F2IP"}),
    ("integer and predicate", {"IADD3", "IMAD", "LEA", "ISETP", "LOP3", "SHF", "SEL", "MOV", "PLOP3",
                               "IABS", "IMNMX", "P2R", "R2P", "HFMA2", "UMOV", "ULDC", "UIADD3",
                               "USHF", "ULEA", "UISETP", "UIMAD", "ULOP3", "S2R", "S2UR", "CS2R",
                               "VIADD", "IMUL", "FLO", "POPC", "BREV", "PRMT", "R2UR", "ISCADD",
                               "IADD", "SHL", "SHR", "UPRMT", "USEL", "UPLOP3", "VOTE", "VOTEU"}),
    ("loads and stores", {"LDG", "STG", "LDS", "STS", "LD", "ST", "LDL", "STL", "LDC", "LDSM",
                          "ATOM", "ATOMS", "RED", "LDGSTS"}),
    ("shuffles", {"SHFL"}),
    ("barriers and branches", {"BAR", "BRA", "BSSY", "BSYNC", "WARPSYNC", "DEPBAR", "MEMBAR",
                               "NOP", "JMP", "CALL", "RET", "EXIT", "BRX", "YIELD"}),
)
CLASS_OF = {op: name for name, ops in CLASSES for op in ops}

INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?\s*([^;]*);")
BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")


@dataclass
class Instruction:
    address: int
    predicate: str  # "@!P2 " or ""
    opcode: str  # without modifiers: FFMA, MUFU, ...
    modifiers: str  # ".RCP", ".E", ...
    operands: str


def parse_functions(sass: str) -> Dict[str, List[Instruction]]:
    """cuobjdump -sass text -> {function name: its instructions in address order}."""
    functions: Dict[str, List[Instruction]] = {}
    current: Optional[List[Instruction]] = None
    for line in sass.splitlines():
        if "Function :" in line:
            current = functions.setdefault(line.split("Function :", 1)[1].strip(), [])
            continue
        match = INSTRUCTION.search(line)
        if match and current is not None:
            address, predicate, opcode, modifiers, operands = match.groups()
            current.append(Instruction(int(address, 16), predicate or "", opcode, modifiers or "",
                                       operands.strip()))
    return functions


def innermost_loops(code: List[Instruction]) -> List[List[Instruction]]:
    """Each backward branch's loop (target .. branch), where no other backward branch lies inside."""
    loops = []
    for index, ins in enumerate(code):
        if ins.opcode != "BRA":
            continue
        target = BRANCH_TARGET.search(ins.operands)
        if not target or int(target.group(1), 16) >= ins.address:
            continue
        start = int(target.group(1), 16)
        body = [i for i in code[: index + 1] if i.address >= start]
        if not any(i.opcode == "BRA" and BRANCH_TARGET.search(i.operands)
                   and int(BRANCH_TARGET.search(i.operands).group(1), 16) < i.address
                   for i in body[:-1]):
            loops.append(body)
    return loops


def reciprocals(body: List[Instruction]) -> int:
    return sum(1 for i in body if i.opcode == "MUFU" and i.modifiers.startswith(".RCP"))


def hot_loop(code: List[Instruction]) -> List[Instruction]:
    """The innermost loop with the most MUFU.RCP; of those, the shortest (see the module docstring)."""
    loops = innermost_loops(code)
    if not loops:
        raise RuntimeError("no loop found in the kernel's SASS")
    most = max(reciprocals(body) for body in loops)
    return min((body for body in loops if reciprocals(body) == most), key=len)


def count_classes(body: List[Instruction]) -> Tuple[Dict[str, int], Dict[str, int]]:
    """({class: count}, {opcode of an unknown class: count})."""
    counts = collections.Counter({name: 0 for name, _ in CLASSES})
    unknown: collections.Counter = collections.Counter()
    for ins in body:
        name = CLASS_OF.get(ins.opcode)
        if name is None:
            unknown[ins.opcode] += 1
        else:
            counts[name] += 1
    return dict(counts), dict(unknown)


def _tool(name: str) -> str:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return bundled


def disassemble(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout


RESOURCES = re.compile(r"Function (\S+):\s*REG:(\d+) STACK:\d+ SHARED:\d+ LOCAL:(\d+)")


def resources(cubin: bytes) -> Dict[str, Tuple[int, int]]:
    """{mangled function name: (registers per thread, local memory bytes per thread)}."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
    return {name: (int(regs), int(local)) for name, regs, local in RESOURCES.findall(text)}


def triton_cubin(block: int, warps: int) -> bytes:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("benchmarks.sass_loop compiles for GPUs: run it without TRITON_INTERPRET=1")
    import triton
    from triton.backends.compiler import GPUTarget

    from rkkd_kernels.triton_tools import KernelVariant

    variant = KernelVariant("pairs", "float32", hard=False, need_gs=True, need_gt=False,
                            fused=True, block=block, num_warps=warps)
    compiled = triton.compile(variant.source(), target=GPUTarget("cuda", 90, 32),
                              options=variant.options())
    return compiled.asm["cubin"]


CUDA_KERNEL = re.compile(r"pair_sums<float, float, rkkd::\(anonymous namespace\)::RatioPath<float, false>, "
                         r"false, false>")


def build_flags():
    """The build's own flags (setup.py, imported without building)."""
    spec = importlib.util.spec_from_file_location("rkkd_setup", os.path.join(REPO_ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cuda_cubin() -> bytes:
    """csrc/kendall_cuda.cu for sm_90 only, with the package build's nvcc flags (setup.py)."""
    import torch.utils.cpp_extension as cpp

    includes = [f"-I{p}" for p in cpp.include_paths("cuda")] + [f"-I{sysconfig.get_paths()['include']}"]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "kendall_cuda.cubin")
        cmd = ["nvcc", "-cubin", "-arch=sm_90", "-std=c++20", *build_flags().nvcc_flags(),
               *cpp.COMMON_NVCC_FLAGS, "-DTORCH_EXTENSION_NAME=sass_loop", *includes,
               "-o", out, os.path.join(REPO_ROOT, "csrc", "kendall_cuda.cu")]
        subprocess.run(cmd, check=True)
        with open(out, "rb") as f:
            return f.read()


def demangled(names: List[str]) -> Dict[str, str]:
    text = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                          check=True).stdout
    return dict(zip(text.splitlines(), names))


def kernel_code(kernel: str, sass: str) -> Tuple[str, List[Instruction]]:
    functions = parse_functions(sass)
    if kernel == "triton":
        name = "_kendall_pairs_kernel"
    else:
        matches = [d for d in demangled(list(functions)) if CUDA_KERNEL.search(d)]
        if len(matches) != 1:
            raise RuntimeError(f"expected one CUDA kernel like {CUDA_KERNEL.pattern}, found {matches}")
        name = demangled(list(functions))[matches[0]]
    return name, functions[name]


def report(label: str, body: List[Instruction]) -> None:
    counts, unknown = count_classes(body)
    pairs = reciprocals(body) / 2
    print(f"{label}: hot loop {body[0].address:#x}..{body[-1].address:#x}, {len(body)} instructions "
          f"per pass, {pairs:g} pairs per thread per pass (MUFU.RCP / 2)")
    print(f"  {'class':34s} {'per pass':>8s} {'per pair':>8s}")
    for name, _ in CLASSES:
        print(f"  {name:34s} {counts[name]:8d} {counts[name] / pairs:8.3f}")
    for opcode, n in sorted(unknown.items()):
        print(f"  {'(unclassified) ' + opcode:34s} {n:8d} {n / pairs:8.3f}")
    print(f"  {'all':34s} {len(body):8d} {len(body) / pairs:8.3f}")
    mufu = counts["MUFU"] / pairs
    # H200: 132 SMs at 1.98 GHz; per SM and cycle 4 warp instructions issued (128 thread
    # instructions) and 16 MUFU results.
    clock_sms = 132 * 1.98e9
    issue, mufu_rate = 128 * clock_sms / (len(body) / pairs), 16 * clock_sms / mufu
    print(f"  H200 bounds: issue {issue:.3g} pairs/s, MUFU {mufu_rate:.3g} pairs/s "
          f"-> {min(issue, mufu_rate):.3g} pairs/s ({'issue' if issue < mufu_rate else 'MUFU'}-bound)")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", choices=("triton", "cuda", "both"), default="both")
    parser.add_argument("--config", default="64:8", help="Triton BLOCK:warps (default 64:8)")
    parser.add_argument("--dump", help="also write the hot loop's SASS to this file (one kernel)")
    args = parser.parse_args(argv)
    kernels = ("triton", "cuda") if args.kernel == "both" else (args.kernel,)
    for kernel in kernels:
        if kernel == "triton":
            block, warps = (int(x) for x in args.config.split(":"))
            cubin, label = triton_cubin(block, warps), f"Triton {block}:{warps}"
        else:
            cubin, label = cuda_cubin(), "CUDA"
        name, code = kernel_code(kernel, disassemble(cubin))
        body = hot_loop(code)
        report(label, body)
        usage = resources(cubin)
        regs, local = usage[name]
        # Every pair kernel of the build (CUDA: each dtype, path and flag set) must stay unspilled.
        spilling = sorted(n for n, (_, spill) in usage.items() if spill and "pair" in n)
        print(f"  registers {regs}, local memory {local} B per thread; pair kernels in this build "
              f"that spill: {len(spilling)} of {sum('pair' in n for n in usage)}")
        for n in spilling:
            print(f"    spills {usage[n][1]} B: {n}")
        if args.dump:
            with open(args.dump if len(kernels) == 1 else f"{args.dump}.{kernel}", "w") as f:
                f.write(f"// {name}\n")
                f.writelines(f"/*{i.address:04x}*/ {i.predicate}{i.opcode}{i.modifiers} {i.operands} ;\n"
                             for i in body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
