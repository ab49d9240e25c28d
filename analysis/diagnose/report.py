"""What a diagnosis writes: diagnosis.json and .csv, the stdout summary, and the glossary of the
per-layer table's columns."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from analysis.diagnose.diagnosis import Diagnosis

# What every column of the per-layer table means (report glossary, diagnosis.json).
GLOSSARY: dict[str, str] = {
    "layer": "−1 the embedding (input of block 0), i the output of block i, L the head input after a final norm",
    "point": "the probe point's stable name (embed, blocks.{i}.resid_post, final)",
    "module": "the module whose output the row measures",
    "variance": "per-token variance over coordinates, averaged (E[x²] minus the squared token mean)",
    "pre_norm_second_moment": "E[x²] of the sum entering a block's output norm (post-norm blocks only)",
    "second_moment": "E[x²] of the stream over tokens and coordinates",
    "growth": "second_moment over the previous row's: how much this block scales the stream",
    "q_rel": "second_moment over the embedding's",
    "median_token_second_moment": "the median token's ‖x_t‖²/d: the stream's size robust to a few massive tokens",
    "q_rel_median": "median_token_second_moment over the embedding's (the robust stream growth)",
    "first_token_second_moment": "the first token's ‖x_0‖²/d (the attention-sink position), kept apart",
    "massive_ratio": "largest |x_ti| over the median token's RMS (≥ 100: massive activations)",
    "peak_abs": "largest |x_ti| at the block's output over the sequences",
    "peak_ratio": "the same over the median token's RMS (largest over batches)",
    "peak_token": "token position of the largest activation (commonest over batches)",
    "peak_coordinate": "its coordinate (commonest over batches)",
    "peak_share": "share of batches whose largest activation sits at that (token, coordinate)",
    "effective_rank_normalized": "effective rank of the tokens scaled to unit norm: one massive "
                                 "token counts as one direction, not as the whole spectrum",
    "token_cosine": "mean cosine between distinct tokens of a sequence (1: all tokens one vector)",
    "dong_residual": "‖X − mean token‖/‖X‖ per sequence (Dong et al. 2021); 0 at rank collapse",
    "effective_rank": "exp(entropy of the normalised singular values) of a sequence's [T, d] "
                      "matrix (Roy & Vetterli 2007); at most min(T, d) of the sampled tokens",
    "angle_deg": "mean angle between a token's stream vector before and after the block",
    "branch_rel": "relative contribution: ‖attention out‖⊕‖FFN out‖ over ‖block input‖ per token "
                  "(before any output norm, ⊕ the root of the sum of squares), mean over tokens",
    "branch_rel_median": "the same for the median token (one outlier token cannot move it)",
    "skip_out_change": "‖h' − h‖/‖h‖ of the head input h when this block is replaced by the identity",
    "skip_loss_delta": "loss change in nats when this block is skipped (NaN with the surrogate loss)",
    "grad_rel": "gradient second moment over the last block's (g_l/g_L)",
    "grad_scale_free": "‖∂L/∂x_l‖·‖x_l‖ (gradient RMS × median token's RMS) over the last block's: "
                       "the gradient profile with the stream's scale taken out",
    "grad_second_moment": "E[(∂loss/∂x)²] at this point (scales with the loss's reduction: compare ratios)",
    "grad_token_cosine": "token cosine of the gradient ∂loss/∂x",
    "max_abs": "largest |x| at this point",
    "precision_headroom": "relative contribution over bfloat16's rounding step 2⁻⁸: how many rounding steps of "
                          "the stream the block's update spans (below 1: stored in bfloat16, most of it is "
                          "rounded away)",
    "fp16_range_headroom": "float16's largest value (65 504) over the block output's largest |x|: below 1, "
                           "the stream overflows float16",
    "init_*": "the same quantity in the same architecture re-initialized (what training changed)",
    "theory_*": "the init theory for the re-initialized model (theory.solve.predict_profile)",
    "*_se": "standard error of the column before it (over batches, or over sequences for skip_*)",
}


def glossary_for(column: str) -> str | None:
    """The glossary entry explaining ``column`` (exact name, else an init_/theory_/_se pattern)."""
    import fnmatch
    return GLOSSARY.get(column) or next((v for k, v in GLOSSARY.items() if fnmatch.fnmatch(column, k)), None)


def save(d: Diagnosis, out: Path) -> list[Path]:
    """diagnosis.json (meta, verdict, findings, per-layer table) and diagnosis.csv (the table)."""
    from analysis.infra.files import write_csv, write_json

    def clean(v):
        return None if isinstance(v, float) and not math.isfinite(v) else v

    doc = dict(d.meta, verdict=d.verdict, notes=d.notes,
               findings=[{k: clean(v) for k, v in r.items()} for r in d.findings.to_dict("records")],
               layers=[{k: clean(v) for k, v in r.items()} for r in d.table.to_dict("records")])
    js, csv = out / "diagnosis.json", out / "diagnosis.csv"
    write_json(js, doc, indent=1, default=float)
    write_csv(d.table, csv, index=False)
    return [js, csv]


TABLE_COLUMNS = ["layer", "second_moment", "q_rel_median", "token_cosine", "effective_rank_normalized",
                 "angle_deg", "branch_rel_median", "skip_out_change", "skip_loss_delta", "grad_rel",
                 "grad_scale_free", "peak_ratio", "precision_headroom", "init_token_cosine", "init_branch_rel_median"]
SHORT = {"branch_rel_median": "contrib", "skip_out_change": "skip_out", "skip_loss_delta": "skip_loss",
         "init_token_cosine": "init_cos", "init_branch_rel_median": "init_contrib", "q_rel_median": "q_med",
         "token_cosine": "tok_cos", "effective_rank_normalized": "eff_rank_u", "second_moment": "E[x²]",
         "grad_scale_free": "grad_sf", "peak_ratio": "peak", "precision_headroom": "bf16_room"}


def text_report(d: Diagnosis) -> str:
    """The stdout summary: model, layout, the per-layer table, findings, verdict."""
    cols = [c for c in TABLE_COLUMNS if c in d.table and d.table[c].notna().any()]
    tab = d.table[cols].rename(columns=SHORT)
    tab.insert(1, "where", d.table["point"].str.replace(".resid_post", "", regex=False))
    lines = [f"model: {d.meta['model']}", f"blocks: {d.meta['layout']}",
             f"text: {d.meta['text']}; {d.meta['sequences_used']} × {d.meta['seq_len']} tokens forward, "
             f"{d.meta.get('grad_sequences_used', d.meta['grad_sequences'])} backward ({d.meta['loss']} loss), skip test on "
             f"{d.meta['skip_sequences']}, re-initialized model on {d.meta['init_sequences']}", "",
             tab.to_string(index=False, float_format=lambda v: f"{v:.4g}"),
             f"(q_med: median token's E[x²] over the embedding's; eff_rank_u: effective rank of unit-norm "
             f"tokens, at most {d.meta['max_effective_rank']}; contrib: median token's relative contribution; "
             "grad_sf: scale-free gradient; peak: largest |x| over the median token's RMS; bf16_room: "
             "contribution over bfloat16's rounding step (below 1: mostly rounded away); init_*: the "
             "re-initialized model; every column: diagnosis.json 'glossary')",
             "", "findings:"]
    for r in d.findings.itertuples():
        lines.append(f"  [{r.severity}] {r.message}")
    lines += [f"  note: {n}" for n in d.notes]
    lines += ["", f"verdict: {d.verdict}  ({d.meta['seconds_total']:.1f} s)"]
    return "\n".join(lines)
