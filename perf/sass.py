"""python -m perf.sass: a cubin's SASS with each instruction's scheduling control bits.

    python -m perf.sass CUBIN [--grep REGEX] [--loads]

``cuobjdump -sass`` prints every sm_90 instruction as text plus its 128-bit encoding (two
64-bit words).  Bits 41-61 of the second word are the control bits ptxas sets for the warp
scheduler: the stall count (bits 0-3), the yield flag (4), the scoreboard a variable-latency
instruction signals when its result is written (5-7; 7 is none) or when its source registers
may be reused (8-10), the scoreboards it waits on before issuing (a 6-bit mask, 11-16), and the
operand reuse flags (17-20).

A scoreboard counts its instructions in flight, so an instruction that waits on one waits for
all of them.  Session 25 found with this that every global load of the small-head sparse
producer's loop shares scoreboard 5: the first use of any loaded register waits for the whole
gather (perf/results/NOTES.md).  ``--loads`` prints how the kernel's loads spread over the
scoreboards; ``--grep`` lists the matching instructions with their bits.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import NamedTuple, Optional

NO_SCOREBOARD = 7
# one instruction: "/*0a30*/   LDG.E.128 R4, desc[UR4][R2.64] ;   /* 0x... */" then "/* 0x... */"
_TEXT = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s*(.*?)\s*;\s*/\*\s*(0x[0-9a-f]+)\s*\*/")
_WORD = re.compile(r"^\s*/\*\s*(0x[0-9a-f]+)\s*\*/")
# global loads whose result lands in registers (not cp.async's LDGSTS, not its LDGDEPBAR)
_REGISTER_LOAD = re.compile(r"\bLDG\.")


class Instruction(NamedTuple):
    address: int
    text: str         # as cuobjdump prints it, predicate included
    stall: int
    yields: bool
    write_sb: int     # NO_SCOREBOARD: none
    read_sb: int
    wait_mask: int    # bit i: waits on scoreboard i
    reuse: int

    def waits_on(self, sb: int) -> bool:
        return bool(self.wait_mask >> sb & 1)


def cuobjdump() -> Optional[str]:
    """cuobjdump on PATH, else the one the nvidia-cuda-cuobjdump wheel ships; None if neither."""
    exe = shutil.which("cuobjdump")
    if exe is None:
        try:
            import nvidia
        except ImportError:
            return None
        for root in nvidia.__path__:
            for cand in Path(root).glob("*/bin/cuobjdump"):
                exe = str(cand)
    return exe


def dump(cubin: Path, exe: Optional[str] = None) -> str:
    """``cuobjdump -sass`` of ``cubin`` (its nvdisasm found beside it)."""
    exe = exe or cuobjdump()
    if exe is None:
        raise FileNotFoundError("cuobjdump not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    env = dict(os.environ, PATH=os.environ.get("PATH", "") + os.pathsep + str(Path(exe).parent))
    r = subprocess.run([exe, "-sass", str(cubin)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"cuobjdump -sass {cubin}: {r.stderr.strip()}")
    return r.stdout


def decode(control: int) -> tuple[int, bool, int, int, int, int]:
    """(stall, yield, write scoreboard, read scoreboard, wait mask, reuse) of 21 control bits."""
    return (control & 0xF, bool(control >> 4 & 1), control >> 5 & 7, control >> 8 & 7,
            control >> 11 & 0x3F, control >> 17 & 0xF)


def parse(sass_text: str) -> list[Instruction]:
    """Every instruction of a ``cuobjdump -sass`` listing, in order (all kernels of it)."""
    out = []
    lines = sass_text.splitlines()
    for i, line in enumerate(lines[:-1]):
        m = _TEXT.match(line)
        w = _WORD.match(lines[i + 1]) if m else None
        if m and w:
            out.append(Instruction(int(m.group(1), 16), m.group(2), *decode(int(w.group(1), 16) >> 41 & 0x1FFFFF)))
    return out


def load_scoreboards(instructions: list[Instruction]) -> Counter:
    """How many register-destination global loads signal each scoreboard."""
    return Counter(ins.write_sb for ins in instructions if _REGISTER_LOAD.search(ins.text))


def _row(ins: Instruction) -> str:
    sb = lambda v: "-" if v == NO_SCOREBOARD else str(v)  # noqa: E731
    waits = ",".join(str(i) for i in range(6) if ins.waits_on(i)) or "-"
    return f"{ins.address:06x}  {ins.text[:72]:<72}  stall {ins.stall:2d}  wr {sb(ins.write_sb)}  rd {sb(ins.read_sb)}  wait {waits}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m perf.sass", description=__doc__.split("\n\n")[0])
    ap.add_argument("cubin", type=Path)
    ap.add_argument("--grep", help="list the instructions matching this regular expression")
    ap.add_argument("--loads", action="store_true", help="the scoreboards of the register-destination global loads")
    args = ap.parse_args(argv)
    instructions = parse(dump(args.cubin))
    if args.loads:
        for sb, n in sorted(load_scoreboards(instructions).items()):
            print(f"scoreboard {sb}: {n} LDG")
    if args.grep:
        pat = re.compile(args.grep)
        for ins in instructions:
            if pat.search(ins.text):
                print(_row(ins))
    if not (args.loads or args.grep):
        for ins in instructions:
            print(_row(ins))


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:  # piped into head
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
