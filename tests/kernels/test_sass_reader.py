"""compile_check's reading of SASS control flow, on hand-written ``nvdisasm -c`` text (no CUDA
toolkit needed): loops are the natural loops of the control-flow graph reachable from the
entry, so the mbarrier retry stubs that ptxas places after ``EXIT`` (and that branch back
into the main loop) belong to the main loop they serve, and the epilogue between the loop
and the stubs does not. The real sm_90a TMA kernels are checked in test_compile_check.py."""

from __future__ import annotations

from soda_kernels import sass_cfg
from soda_kernels.compile_check import _sass_loops, _sass_main_loops, sass_facts

# The shape of Triton's TMA matmul on sm_90a (benchmarks/results/sm90_codegen.md,
# matmul_grad_weight_tma): a pipelined main loop whose mbarrier waits try once inline and
# branch to a spin stub placed after EXIT; the stub jumps back into the loop. The epilogue
# spills (STL / LDL) and has a predicated EXIT; the trailing self-branch is the unreachable
# trap ptxas appends after the last EXIT.
TMA_LIKE = """
//--------------------- .text._fixture_kernel  --------------------------
        .global         _fixture_kernel
_fixture_kernel:
.text._fixture_kernel:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R4, SR_CTAID.X ;
        /*0020*/                   ISETP.GE.AND P0, PT, R4, 0x1, PT ;
        /*0030*/              @!P0 BRA `(.L_x_2) ;
.L_x_0:
        /*0040*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR15+0x24000], R5 ;
        /*0050*/              @!P1 BRA `(.L_x_3) ;
.L_x_1:
        /*0060*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0070*/                   @UP1 UTMALDG.2D [UR16], [UR6] ;
        /*0080*/                   IADD3 R4, R4, -0x1, RZ ;
        /*0090*/                   ISETP.NE.AND P0, PT, R4, RZ, PT ;
        /*00a0*/               @P0 BRA `(.L_x_0) ;
.L_x_2:
        /*00b0*/                   STL [R1], R24 ;
        /*00c0*/                   LDL R25, [R1] ;
        /*00d0*/                   LDG.E R26, desc[UR28][R20.64] ;
        /*00e0*/               @P2 STG.E.128 desc[UR28][R20.64], R24 ;
        /*00f0*/              @!P2 EXIT ;
        /*0100*/                   LDL R27, [R1+0x4] ;
        /*0110*/                   STG.E.128 desc[UR28][R22.64], R24 ;
        /*0120*/                   EXIT ;
.L_x_3:
        /*0130*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR15+0x24000], R5 ;
        /*0140*/              @!P1 BRA `(.L_x_3) ;
        /*0150*/                   BRA `(.L_x_1) ;
.L_x_4:
        /*0160*/                   BRA `(.L_x_4);
        /*0170*/                   NOP;
.L_x_5:
"""


def _ops(lines: list[str]) -> list[str]:
    return [ln.split("*/", 1)[1].strip() for ln in lines if "*/" in ln]


def test_retry_stub_after_exit_is_not_a_loop_over_the_epilogue():
    loops = _sass_main_loops(TMA_LIKE)
    assert len(loops) == 1, loops
    ops = _ops(loops[0])
    assert any(op.startswith("HGMMA") for op in ops)
    # The stub is part of the loop (it runs when the first try of the wait fails) ...
    assert sum(op.startswith("SYNCS.PHASECHK") for op in ops) == 2, ops
    # ... the epilogue between the loop and the stub is not.
    assert not [op for op in ops if op.split()[0] in ("STL", "LDL", "LDG.E", "EXIT")], ops
    assert len(ops) == 10, ops  # 2 + 5 (loop) + 3 (stub)
    facts = sass_facts(TMA_LIKE, has_dot=True)
    assert facts["spills_in_main_loop"] == 0 and facts["narrow_loads_in_main_loop"] == 0, facts
    assert facts["main_loop_instructions"] == 10, facts


def test_code_reachable_only_after_exit_is_ignored():
    """The trap self-loop after the last EXIT is unreachable: not a loop. The stub's spin is
    (an inner loop of the main loop), and so is the main loop."""
    loops = [_ops(loop) for loop in _sass_loops(TMA_LIKE)]
    assert not [ops for ops in loops if "BRA `(.L_x_4);" in ops], loops
    assert sorted(len(ops) for ops in loops) == [2, 10], loops


def test_a_kernel_without_dot_counts_narrow_loads_in_any_loop():
    """No matrix instruction: the scalar load in the epilogue is outside every loop, so it
    is not a narrow load in a loop; moved into the stub's spin loop, it is."""
    assert sass_facts(TMA_LIKE.replace("HGMMA", "FADD"), has_dot=False)["narrow_loads_in_loops"] == 0
    spin = TMA_LIKE.replace("/*0130*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR15+0x24000], R5",
                            "/*0130*/                   LDG.E R26, desc[UR28][R20.64]")
    assert sass_facts(spin, has_dot=False)["narrow_loads_in_loops"] == 1


def test_a_branch_with_a_predicate_operand_closes_a_loop():
    """``@!P0 BRA P2, target`` (taken when !P0 and P2: how ptxas closes embedding_merge's
    walk) is a conditional branch like any other."""
    sass = """
_k:
        /*0000*/                   MOV R0, RZ ;
.L_x_0:
        /*0010*/                   LDG.E R14, desc[UR6][R12.64] ;
        /*0020*/                   FADD R5, R14, R5 ;
        /*0030*/              @!P0 BRA P2, `(.L_x_0) ;
        /*0040*/                   EXIT ;
"""
    assert [_ops(loop) for loop in _sass_loops(sass)] == [
        ["LDG.E R14, desc[UR6][R12.64] ;", "FADD R5, R14, R5 ;", "@!P0 BRA P2, `(.L_x_0) ;"]]
    assert sass_facts(sass, has_dot=False)["narrow_loads_in_loops"] == 1
    # Unguarded, the predicate operand alone makes it conditional: the EXIT stays reachable.
    bare = sass.replace("@!P0 BRA P2,", "BRA.U !UP0,")
    cfg = sass_cfg.build(bare)
    loop_block = next(b for b, (first, last) in enumerate(cfg.blocks)
                      if "BRA.U" in cfg.instrs[last].line)
    assert len(cfg.succ[loop_block]) == 2, cfg.succ
