"""benchmarks.sass_loop's reading of SASS, on a made-up listing (no GPU compile here)."""

from benchmarks import sass_loop

# Four loops: 0x10-0x20 (1 reciprocal), 0x30-0x90 (2 in 7 instructions), 0xa0-0x110 (2 in 8) and
# an outer one, 0x00-0x120, that holds the others and so is not innermost.
LISTING = """
        Function : kernel
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   MUFU.RCP R2, R3 ;
        /*0020*/              @!P0 BRA 0x10 ;
        /*0030*/                   FADD R4, R5, R6 ;
        /*0040*/                   MUFU.RCP R2, R3 ;
        /*0050*/                   MUFU.RCP R7, R8 ;
        /*0060*/                   FFMA R4, R5, R6, R4 ;
        /*0070*/                   SHFL.IDX PT, R9, R9, R10, 0x1f ;
        /*0080*/                   ISETP.GE.AND P1, PT, R11, R12, PT ;
        /*0090*/               @P1 BRA 0x30 ;
        /*00a0*/                   FMUL R4, R5, R6 ;
        /*00b0*/                   MUFU.RCP R2, R3 ;
        /*00c0*/                   MUFU.RCP R2, R3 ;
        /*00d0*/                   LDG.E R2, desc[UR4][R2.64] ;
        /*00e0*/                   MUFU.EX2 R2, R3 ;
        /*00f0*/                   FMUL R4, R5, R6 ;
        /*0100*/                   FADD R4, R5, R6 ;
        /*0110*/                   BRA 0xa0 ;
        /*0120*/              @!P2 BRA 0x0 ;
        /*0130*/                   EXIT ;
"""


def test_hot_loop_is_the_shortest_innermost_loop_with_the_most_reciprocals():
    code = sass_loop.parse_functions(LISTING)["kernel"]
    loops = sass_loop.innermost_loops(code)
    assert [(loop[0].address, loop[-1].address) for loop in loops] == [(0x10, 0x20), (0x30, 0x90),
                                                                       (0xa0, 0x110)]
    body = sass_loop.hot_loop(code)
    assert (body[0].address, body[-1].address) == (0x30, 0x90)
    counts, unknown = sass_loop.count_classes(body)
    assert unknown == {}
    assert (counts["MUFU"], counts["FADD"], counts["FFMA"], counts["FMUL"]) == (2, 1, 1, 0)
    assert counts["shuffles"] == 1 and counts["integer and predicate"] == 1
    assert counts["barriers and branches"] == 1 and body[-1].predicate == "@P1 "
    assert sum(counts.values()) == len(body) == 7
