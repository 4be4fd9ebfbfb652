"""The quantization options: each preset's scheme (what bits, blocks and passes each weight gets, recorded in
the manifest) and every check of the options, run before any work (quantize.py explains the choices)."""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..calibration import activations as A
from ..errors import ArgumentError, SwitchError, not_a_file
from ..manifest_graphs import two_pass_built
from .components import joined_parts

QUANTS = ("fp32", "fp16", "int8", "int4")
TWO_PASS = ("none", "head", "all")
LAYER_OPS = ("nbits", "integer")
HEAD_OPS = ("nbits", "integer")


@dataclass(frozen=True)
class Scheme:
    """How each weight is quantized (recorded in the manifest). Roles: the layers' MatMuls, the logit
    head and the embedding table (a tied head and table share one packed copy)."""

    bits: int  # layers
    head_bits: int  # head and table (their infrequent rows, with frequent_rows)
    embed_bits: int  # an untied embedding table
    block_size: int  # layers
    head_block_size: int  # head and table
    symmetric: bool | None  # None: 8-bit symmetric (exact on Q8_0 / Q5_0 grids), 4-bit with zero points
    accuracy_level: int
    frequent_rows: int = 0  # head/table rows of the most frequent calibration tokens kept at 8 bits
    keep_8bit: tuple[str, ...] = ()  # glob patterns of weight names kept at 8 bits
    gptq: bool = False  # 4-bit weights rounded by GPTQ against calibration activations
    two_pass: str = "none"  # MatMulNBits activations in two int8 passes: none, head, layers or all
    smooth: float = 0.0  # alpha of the layers' activation smoothing (x / s, W * s, s = max|x|^alpha)
    layer_op: str = "nbits"  # 8-bit layers as MatMulNBits (blocks) or MatMulIntegerToFloat (int8 columns)
    head_op: str = "nbits"  # the head as MatMulNBits over the table, or int8 columns rescored by the table
    calibration: str | None = field(default=None, compare=False)  # the calibration text used
    calibration_tokens: int | None = field(default=None, compare=False)  # its tokens the activations were read on
    calibration_sha256: str | None = field(default=None, compare=False)  # which text that was (CalibrationText.sha256)

    def bits_for(self, kind: str, name: str = "") -> int:
        """A joined weight ("...self_attn.q_proj+k_proj+v_proj.weight") stays at 8 bits when a pattern
        matches its name or any of its parts' ("...self_attn.v_proj.weight")."""
        bits = {"matmul": self.bits, "head": self.head_bits, "gather": self.embed_bits}[kind]
        names = [name] + joined_parts(name)
        return 8 if any(fnmatch.fnmatchcase(n, p) for n in names for p in self.keep_8bit) else bits

    def block_for(self, kind: str) -> int:
        return self.block_size if kind == "matmul" else self.head_block_size

    def symmetric_for(self, bits: int) -> bool:
        return bits == 8 if self.symmetric is None else self.symmetric

    @property
    def needs_activations(self) -> bool:
        return self.smooth > 0 or self.gptq

    @property
    def takes_calibration(self) -> bool:
        """GPTQ and smoothing read the calibration's activations, int4's frequent rows its token counts."""
        return self.needs_activations or (self.frequent_rows > 0 and self.head_bits < 8)

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# chosen by measurement (bench_quant.py): see the module docstring
PRESETS = {
    "int8": dict(bits=8, head_bits=8, embed_bits=8, block_size=32, head_block_size=32, frequent_rows=0,
                 gptq=True, two_pass="all", smooth=0.0),
    "int4": dict(bits=8, head_bits=4, embed_bits=4, block_size=32, head_block_size=32, frequent_rows=32768,
                 gptq=True, two_pass="all", smooth=0.0),
}
CALIBRATED = ("frequent_rows", "gptq", "smooth")  # the options that need calibration activations
CALIBRATION_TOKENS = 8192  # default: positions whose activations calibrate GPTQ and smoothing
# GPTQ needs each input's second moment [K, K]: wider inputs (E2B's 12,288-wide MLP: 0.6 GB each, 20 of
# them) keep the importance-weighted grid search instead
GPTQ_MAX_K = 4096


def scheme(quant: str, block_size: int | None = None, symmetric: bool | None = None, accuracy_level: int = 4, *,
           layer_bits: int | None = None, frequent_rows: int | None = None, keep_8bit=(), gptq: bool | None = None,
           two_pass: str | None = None, smooth: float | None = None, layer_op: str | None = None,
           head_op: str | None = None, calibrated: bool = True) -> Scheme | None:
    """The scheme for `quant` (None for the float quants) after checking every option; None options
    keep the preset's value. `calibrated` False (no calibration text): the calibrated options are off,
    and asking for one is an error. Refusals are ArgumentErrors naming each option by its keyword (block_size=;
    from export(), its quant_options key), --block-size from the CLI."""
    if quant not in QUANTS:
        raise ArgumentError("quant", quant, f"is not supported (choose from {', '.join(QUANTS)})")
    if block_size is not None and (not 16 <= block_size <= 256 or block_size & (block_size - 1)):
        raise ArgumentError("block_size", block_size, "must be a power of two from 16 to 256 (the blocks ONNX "
                            "Runtime's MatMulNBits kernels take)")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ArgumentError("accuracy_level", accuracy_level, "must be 0..4 (MatMulNBits)")
    if layer_bits not in (None, 4, 8):
        raise ArgumentError("layer_bits", layer_bits, "must be 4 or 8")
    if frequent_rows is not None and frequent_rows < 0:
        raise ArgumentError("frequent_rows", frequent_rows, "must be 0 or more")
    if two_pass not in (None, *TWO_PASS):
        raise ArgumentError("two_pass", two_pass, f"must be one of {', '.join(TWO_PASS)}")
    if layer_op not in (None, *LAYER_OPS):
        raise ArgumentError("layer_op", layer_op, f"must be one of {', '.join(LAYER_OPS)}")
    if head_op not in (None, *HEAD_OPS):
        raise ArgumentError("head_op", head_op, f"must be one of {', '.join(HEAD_OPS)}")
    if layer_op == "integer" and layer_bits == 4:
        raise ArgumentError("layer_op", layer_op, "needs 8-bit layers (MatMulIntegerToFloat has no 4-bit "
                            "weights), and the layer bits asked for are 4")
    if smooth is not None and not 0.0 <= smooth <= 1.0:
        raise ArgumentError("smooth", smooth, "must be between 0 (off) and 1")
    if two_pass in ("head", "all") and accuracy_level != 4:
        raise ArgumentError("two_pass", two_pass, f"needs accuracy level 4 (the two int8 passes are that level's "
                            f"integer kernel), and the accuracy level asked for is {accuracy_level}")
    keep_8bit = tuple(keep_8bit or ())
    for p in keep_8bit:
        if not isinstance(p, str) or not p.strip():
            raise ArgumentError("keep_8bit", p, "is no weight-name pattern: give patterns such as '*down_proj*'")
    asked = dict(frequent_rows=frequent_rows, gptq=gptq, smooth=smooth)
    if not calibrated:
        for key, value in asked.items():
            if value:
                error = SwitchError if value is True else ArgumentError  # gptq=True: --gptq takes no value
                raise error(key, value, "needs calibration text, and the calibration asked for is none")
    if quant not in PRESETS:
        return None
    p = dict(PRESETS[quant])
    if not calibrated:
        p.update(frequent_rows=0, gptq=False, smooth=0.0)
    given = dict(asked, two_pass=two_pass, bits=layer_bits, layer_op=layer_op, head_op=head_op)
    p.update({k: v for k, v in given.items() if v is not None})
    _check_two_pass_applies(two_pass, p.get("layer_op", "nbits"), p.get("head_op", "nbits"))
    if accuracy_level != 4 and two_pass is None:  # the preset's passes need level 4: none are built
        p["two_pass"] = "none"
    # recorded as built, which the manifest and `edgemtp info` show: "all" beside integer layers is the head's
    # passes alone, beside an integer head the layers' ("layers", which the rewrite builds as "all")
    p["two_pass"] = two_pass_built(p["two_pass"], p.get("layer_op", "nbits"), p.get("head_op", "nbits"))
    if block_size:
        p.update(block_size=block_size, head_block_size=block_size)
    return Scheme(**p, symmetric=symmetric, accuracy_level=accuracy_level, keep_8bit=keep_8bit)


def _check_two_pass_applies(two_pass: str | None, layer_op: str, head_op: str) -> None:
    """Two passes are MatMulNBits' (the nbits head, and with `all` the nbits layers): asked for where no
    MatMulNBits would take them, the option would change nothing, silently."""
    if two_pass == "head" and head_op == "integer":
        raise ArgumentError("two_pass", two_pass, "does nothing with the integer head op (the integer head takes "
                            "no MatMulNBits passes): drop one of them")
    if two_pass == "all" and head_op == "integer" and layer_op == "integer":
        raise ArgumentError("two_pass", two_pass, "does nothing with the integer layer and head ops (no "
                            "MatMulNBits left to take the passes): drop it")


def check_widths(sch: Scheme, graph) -> None:
    """Every layer MatMul's input width against the layers' block size, before the fp32 export and the
    calibration (minutes at scale): two-pass activations need whole blocks, and check_shapes sees only the
    hidden size, where down_proj reads the MLP's width and o_proj the heads'. Found in the rewrite only, the
    error came after that work. An integer layer (MatMulIntegerToFloat) takes no blocks."""
    from .quantgraph import role

    if sch.two_pass not in ("all", "layers") or sch.accuracy_level != 4:
        return
    inits = {t.name: t for t in graph.initializer}
    for node in graph.node:
        r = role(node, inits)
        if r is None or r[0] != "matmul" or (sch.layer_op == "integer" and sch.bits_for("matmul", r[1]) == 8):
            continue
        check_two_pass_width(sch.block_for("matmul"), inits[r[1]].dims[0], r[1])


def check_two_pass_width(block: int, k: int, name: str) -> None:
    if k % block:
        raise ArgumentError("block_size", block, f"does not divide the input width {k} of {name}: the layers' "
                            "two-pass activations need whole blocks; give a block size dividing it, or two passes "
                            "for the head only, or none")


def fit_vocab(sch: Scheme, vocab: int, tied: bool) -> Scheme:
    """The scheme for a head table of `vocab` rows: with --frequent-rows as many as its rows or more, every row
    is a frequent one, so the whole head is 8-bit, and recorded so (`tied`: the embedding too, the same table).
    (The split was skipped there, leaving every row at 4 bits while the manifest and `edgemtp info` said the
    frequent rows were kept at 8: Llama 2's 32,000 rows under the preset's 32,768, say.)"""
    if sch.frequent_rows >= vocab and sch.head_bits < 8:
        return replace(sch, head_bits=8, frequent_rows=0, **({"embed_bits": 8} if tied else {}))
    return sch


def check_patterns_match(patterns: tuple[str, ...], weights: list[str]) -> None:
    """A --keep-8bit pattern that matches no weight is a typo, which would quietly keep nothing at 8 bits."""
    names = weights + [part for w in weights for part in joined_parts(w)]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            example = next((n for n in names if n.endswith(".weight") and "layers." in n), names[0] if names else "")
            raise ArgumentError("keep_8bit", pattern, f"matches no weight of the model (names look like "
                                f"{example!r})")


def check_patterns_change(sch: Scheme, graph) -> None:
    """A --keep-8bit pattern whose quantized weights are all 8-bit anyway (int4's layers unless --layer-bits 4),
    or that matches only weights never quantized (norms), keeps nothing more at 8 bits: taken, it was listed in
    the manifest and by `edgemtp info` as kept, the bundle unchanged (int8 refuses the option for that reason)."""
    from .quantgraph import role

    inits = {t.name: t for t in graph.initializer}
    by_role = {"matmul": sch.bits, "head": sch.head_bits, "gather": sch.embed_bits}
    bits = {}  # quantized weight -> its bits without the patterns
    for node in graph.node:
        if r := role(node, inits):
            bits[r[1]] = min(bits.get(r[1], 8), by_role[r[0]])
    for pattern in sch.keep_8bit:
        if all(b == 8 for name, b in bits.items()
               if any(fnmatch.fnmatchcase(n, pattern) for n in [name] + joined_parts(name))):
            raise ArgumentError("keep_8bit", pattern, "changes nothing: every weight it matches is 8-bit already "
                                "or not quantized (int4 keeps the layers at 8 bits unless the layer bits are 4)")


def check_options(quant: str, calibration: str | Path | None = A.CORPORA, calibration_tokens: int | None = None,
                  drafter_quant: str | None = None, **options) -> Scheme | None:
    """Every quantization option checked, before any work is done: one ArgumentError naming the option as the
    caller wrote it, by its keyword from Python (quantize_bundle's, or the key of export()'s quant_options: the
    same name), by its flag from the CLI."""
    if drafter_quant not in (None, "fp32", "int8"):
        raise ArgumentError("drafter_quant", drafter_quant, "must be fp32 or int8")
    if drafter_quant is not None and quant not in PRESETS:
        raise ArgumentError("drafter_quant", drafter_quant, f"applies to int8 and int4 bundles, not {quant} (the "
                            "drafter reads the target's table)")
    if quant == "int8":  # every weight is 8-bit already: these would be ignored, or (layer bits) contradict it
        # (here, not in scheme(): an int4 bundle's drafter weights are quantized as int8 with its options)
        given = [key for key in ("layer_bits", "frequent_rows", "keep_8bit") if options.get(key) not in (None, ())]
        if given:
            raise ArgumentError(given[0], _first(given[0], options[given[0]]), "applies to int4 bundles (int8 "
                                "keeps every weight at 8 bits)")
    if calibration is None and calibration_tokens is not None:
        raise ArgumentError("calibration_tokens", calibration_tokens, "needs calibration text to take them from, "
                            "and the calibration asked for is none")
    if quant in ("fp32", "fp16"):
        given = dict(options, calibration_tokens=calibration_tokens)
        given = {k: v for k, v in given.items() if v not in (None, ())}
        if calibration is not None and str(calibration) != A.CORPORA:
            given = dict(calibration=str(calibration), **given)
        if given:
            key = next(iter(given))
            raise ArgumentError(key, _first(key, given[key]), "applies to int8 and int4 bundles only")
    if calibration_tokens is not None and calibration_tokens < A.WINDOW // 4:
        raise ArgumentError("calibration_tokens", calibration_tokens, f"must be at least {A.WINDOW // 4}")
    if calibration is not None and str(calibration) != A.CORPORA and not Path(calibration).is_file():
        why = not_a_file(calibration)  # 'is a directory, not a file' or 'no such file'
        raise ArgumentError("calibration", str(calibration), f"{why if why.startswith('is ') else 'does not exist'} "
                            f"(give a text file, {A.CORPORA} or none)")
    sch = scheme(quant, calibrated=calibration is not None, **options)
    if sch is not None and calibration_tokens is not None and not sch.needs_activations:
        raise ArgumentError("calibration_tokens", calibration_tokens, "finds nothing to calibrate: nothing takes "
                            "calibration activations here (GPTQ or smoothing; the frequent rows count the whole "
                            "text): drop it")
    check_calibration_taken(sch, calibration)
    return sch


def _first(key: str, value):
    """The value an error names: keep_8bit's first pattern (the CLI's --keep-8bit takes one at a time)."""
    return value[0] if key == "keep_8bit" and isinstance(value, (list, tuple)) else value


def check_calibration_taken(sch: Scheme | None, calibration: str | Path | None) -> None:
    """A calibration text given for a scheme that reads nothing of it is refused. Checked again on the scheme as
    the head is packed (fit_head): a head whole at 8 bits keeps no frequent rows apart."""
    if sch is not None and calibration is not None and str(calibration) != A.CORPORA and not sch.takes_calibration:
        raise ArgumentError("calibration", str(calibration), "finds nothing to calibrate: nothing takes "
                            "calibration text here (GPTQ, smoothing or int4's frequent rows): drop it")


def check_window(text, ids: list[int], capacity: int, bos: bool) -> None:
    """The calibration runs windows of min(512, capacity) positions: a text shorter than one is named."""
    length = min(A.WINDOW, capacity)
    if len(ids) < length - bos:
        raise ArgumentError("calibration", text.source, f"holds {len(ids)} tokens, fewer than one window of "
                            f"{length}")


def check_shapes(sch: Scheme, hidden: int) -> None:
    """What the rewrite needs of the model's widths, before the fp32 export: two-pass activations and the
    integer head work on whole blocks of the hidden size (q/k/v, gate/up and the head read it). Without
    this check the passes were quietly left out (and speculative decoding no longer exact)."""
    for block in dict.fromkeys((sch.block_size, sch.head_block_size)):
        if hidden % block == 0:
            continue
        if sch.two_pass != "none":
            asked = "all" if sch.two_pass == "layers" else sch.two_pass  # "layers" is no --two-pass choice
            raise ArgumentError("block_size", block, f"does not divide the hidden size {hidden}: the two-pass "
                                f"activations ({asked}) need whole blocks; give a block size dividing {hidden}, "
                                "or no two passes")
        if sch.head_op == "integer":
            raise ArgumentError("head_op", sch.head_op, f"rescores whole rows of {block}-blocks: the hidden size "
                                f"{hidden} is not a multiple of the block size {block}")
        if block == sch.head_block_size:  # the rewrite would leave that Gather fp32, the manifest saying otherwise
            raise ArgumentError("block_size", block, f"does not divide the hidden size {hidden}: the embedding's "
                                f"GatherBlockQuantized reads whole blocks (its table would stay fp32 beside the "
                                f"packed head); give a block size dividing {hidden}")
