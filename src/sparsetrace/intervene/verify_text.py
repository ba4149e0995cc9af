"""The text `sparsetrace verify` prints: held-out figures, with the in-sample ones beside them when asked."""

from __future__ import annotations


def format_verify(res: dict) -> str:
    """Held-out figures; where ``res["in_sample"]`` exists, the in-sample figure beside each, labelled."""
    ins = res.get("in_sample") or {}

    def f(x, spec="{:.3f}", key=None):
        text = "n/a" if x is None else spec.format(x)
        if key is not None and ins:
            other = key(ins)
            text += f"   (in-sample {'n/a' if other is None else spec.format(other)})"
        return text

    spec = res.get("specificity") or {}
    sp = res.get("split") or {}
    lines = [
        f"task {res['task']} ({res['metric_name']}, {res['n_prompts']} {sp.get('name', '')} prompts, seed "
        f"{sp.get('seed', 'n/a')}, {res['mode']} ablation), circuit of {len(res['circuit'])} features chosen on "
        f"{(res.get('selection') or {}).get('split', 'n/a')} prompts (seed {(res.get('selection') or {}).get('seed', 'n/a')})",
        f"  m(model) {f(res['m_full'])}   m(circuit only) {f(res['m_circuit'])}   m(no features) {f(res['m_empty'])}"
        f"   m(model without circuit) {f(res['m_without_circuit'])}",
        f"  faithfulness f(C)      {f(res['faithfulness'], key=lambda r: r.get('faithfulness'))}",
        f"  ablation_completeness f(M\\C) {f(res['ablation_completeness'], key=lambda r: r.get('ablation_completeness'))}",
        f"  ablation drop          {f(res['ablation_drop'], '{:.1%}', key=lambda r: r.get('ablation_drop'))}",
        f"  specificity ({spec.get('task', 'n/a')})  {f(spec.get('rel_change'), '{:+.1%}')} "
        f"(baseline {f(spec.get('baseline'))}, ablated {f(spec.get('ablated'))})"
        + (f"   (in-sample {f((ins.get('specificity') or {}).get('rel_change'), '{:+.1%}')})" if ins else ""),
        f"  curve AUC              {f(res.get('curve_auc'))}",
        f"  Spearman(score, effect) {f(res.get('spearman'))} over {len(res.get('single_feature_effects') or [])} features",
    ]
    if res.get("layer_importance"):
        parts = [f"L{r['layer']} {r['component']} ({r['n_features']}) {f(r['drop'], '{:.0%}')}" for r in res["layer_importance"]]
        lines.append("  drop by layer          " + ", ".join(parts))
    if res.get("edge_checks"):
        lines.append(f"  edge checks            {len(res['edge_checks'])} edges, sign agreement "
                     f"{f(res.get('edge_check_sign_agreement'), '{:.0%}')}, Spearman {f(res.get('edge_check_spearman'))}")
    return "\n".join(lines)
