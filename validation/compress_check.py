"""Compressed models: minidp's against deepmd-kit's `dp --tf compress`, and both against the exact model.

    python -m validation.compress_check --out out/compress

For each step (default 0.01 and 0.001): deepmd-kit compresses the .pb
(``dp --tf compress -s STEP``, cached in ``--cache``), minidp compresses the
same model on TF's range of s (:func:`minidp.compress.compress_descriptor`,
``rule="tf"``, the model's own min_nbor_dist), and on every validation case
(the frames as given, sheared, small cells, a cluster, lone atoms;
:mod:`validation.cases`):

- minidp on the .pb's own tables against deepmd-kit TF (the tabulated
  evaluation alone; must agree to ``--tol``);
- minidp on its own tables against deepmd-kit TF, and a table built from
  correctly rounded nodes (long double arithmetic) against deepmd-kit TF:
  how far TF's own round-off puts its table from the best float64 one;
- compressed minus exact, for minidp and for deepmd-kit, per quantity.

Also the tables: minidp's against deepmd-kit's backend-neutral
``DescrptSeA.enable_compression`` on the same model and distance, coefficient
by coefficient. Writes report.md and report.json to --out; exits 1 if a case
is off by more than --tol.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from validation import cases
from validation.compare import QUANTITIES, evaluate, max_errors
from validation.crosscheck import DEFAULT_DATA, DEFAULT_MODEL, geometries, load_frames


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m validation.compress_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="deepmd-kit .pb, with its .dp beside it "
                   "(default: %(default)s)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="system dpdata reads (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("out/compress"), help="report folder (default: %(default)s)")
    p.add_argument("--cache", type=Path, default=Path("out/compress-cache"),
                   help="where the `dp --tf compress`ed .pb files are kept (default: %(default)s)")
    p.add_argument("--steps", type=float, nargs="+", default=[0.01, 0.001], help="table strides (default: 0.01 0.001)")
    p.add_argument("--nframes", type=int, default=4, help="frames per case (default: %(default)s)")
    p.add_argument("--tol", type=float, default=1e-12, help="largest minidp - deepmd-kit difference passed")
    return p


def tf_compressed(pb: Path, step: float, cache: Path) -> Path:
    """deepmd-kit's `dp --tf compress -s step` of pb, made once into the cache folder."""
    out = cache / f"{pb.stem}-compressed-s{step:g}.pb"
    if not out.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [cases.dp_executable(), "--tf", "compress", "-i", str(pb.resolve()), "-o", out.name, "-s", str(step)]
        log = cache / f"{out.stem}.log"
        with log.open("w") as f:
            done = subprocess.run(cmd, check=False, cwd=cache, stdout=f, stderr=subprocess.STDOUT)
        if done.returncode or not out.is_file():
            raise RuntimeError(f"`{' '.join(cmd)}` failed; see {log}")
    return out


def tf_tables(pb: Path, se):
    """The tables inside a `dp --tf compress`ed .pb (one TabulateFusionSeA node per neighbour type,
    in order, when type_one_side), as a minidp Compression."""
    from deepmd.tf.utils.graph import get_tensor_by_name_from_graph, load_graph_def

    from minidp.compress import Table, compression

    if not se.config.type_one_side:
        raise ValueError("reading the tables of a type_one_side: false .pb is not implemented")
    graph, graph_def = load_graph_def(str(pb))
    nodes = sorted((n for n in graph_def.node if n.op == "TabulateFusionSeA"), key=lambda n: (len(n.name), n.name))
    tables = tuple(Table.from_deepmd(get_tensor_by_name_from_graph(graph, n.input[0]),
                                     get_tensor_by_name_from_graph(graph, n.input[1])) for n in nodes)
    return compression(tables, se)


def table_agreement(dp_model: Path, step: float) -> dict:
    """minidp's tables against deepmd-kit's DescrptSeA.enable_compression (both on the neutral range):
    compress_info and every coefficient equal, and the largest |a_k - a_k'| / max |a_k'| per order k."""
    from deepmd.dpmodel.descriptor.se_e2_a import DescrptSeA

    from minidp.compress import compress_descriptor
    from minidp.io.serialization import min_nbor_dist, model_from_dict, read_model_dict

    data = read_model_dict(dp_model)
    rmin = min_nbor_dist(data)
    ours = compress_descriptor(model_from_dict(data).descriptor, rmin, step).compress
    theirs = DescrptSeA.deserialize(data["model"]["descriptor"])
    theirs.enable_compression(rmin, table_stride_1=step, table_stride_2=10 * step)
    worst = np.zeros(6)
    info_equal = coef_equal = True
    for table, cd, ci in zip(ours.tables, theirs.compress_data, theirs.compress_info, strict=True):
        # (nspline, ng, 6)
        ref = np.asarray(cd).reshape(table.coef.shape)
        for k in range(6):
            worst[k] = max(worst[k], float(np.abs(table.coef[..., k] - ref[..., k]).max() / np.abs(ref[..., k]).max()))
        info_equal &= bool(np.array_equal(table.info, np.asarray(ci)))
        coef_equal &= bool(np.array_equal(table.coef, ref))
    return {"min_nbor_dist": rmin, "info_equal": info_equal, "coefficients_equal": coef_equal,
            "bounds": ours.tables[0].info.tolist(), "rel_difference_by_order": worst.tolist()}


def rounded_tables(se, rmin: float, step: float, rule: str):
    """minidp's tables with nodes and coefficients computed in long double, then rounded: the float64
    table closest to the net's, to measure how far deepmd-kit TF's own round-off puts its table."""
    from minidp.compress import (
        _embedding_net,
        compress_descriptor,
        compression,
        hermite_coefficients,
        net_derivatives,
        table_grid,
    )

    base = compress_descriptor(se, rmin, step, rule=rule).compress
    tables = []
    for k, t in enumerate(base.tables):
        ti, tj = (0, k) if base.type_one_side else (k % base.ntypes, k // base.ntypes)
        x, h = table_grid(t.lower, t.upper, t.stride0, t.stride1, t.table_max / t.upper)
        # (nnode, ng) each, in long double (64-bit mantissa: 11 more bits than float64)
        v, d, d2 = net_derivatives(_embedding_net(se, ti, tj), x.astype(np.longdouble)[:, None])
        coef = hermite_coefficients(v, d, d2, h.astype(np.longdouble)).astype(np.float64)
        tables.append(dataclasses.replace(t, coef=coef))
    return compression(tables, se, rmin)


def outputs(pot, geometry) -> list[dict]:
    return [evaluate(pot, g) for g in geometry.groups]


def errors(a, b, geometry) -> dict:
    return {q: e.max_abs for q, e in max_errors(a, b, geometry.groups).items()}


def run_step(step: float, geos, exact: dict, args) -> dict:
    """One table stride: minidp compressed (its own tables, the .pb's, correctly rounded ones) vs
    deepmd-kit compressed, and each compressed model minus its exact one."""
    from deepmd.infer import DeepPot as DeepmdPot

    from minidp import DeepPot
    from minidp.compress import compress_descriptor
    from minidp.io.serialization import min_nbor_dist, model_from_dict, read_model_dict

    data = read_model_dict(args.model.with_suffix(".dp"))
    model, rmin = model_from_dict(data), min_nbor_dist(data)
    se = model.descriptor

    def pot(descriptor):
        return DeepPot(dataclasses.replace(model, descriptor=descriptor))

    pb = tf_compressed(args.model, step, args.cache)
    ours = pot(compress_descriptor(se, rmin, step, rule="tf"))
    # minidp evaluating deepmd-kit's own tables: the tabulated path alone, table round-off aside
    on_tf_tables = pot(dataclasses.replace(se, compress=tf_tables(pb, se)))
    rounded = pot(dataclasses.replace(se, compress=rounded_tables(se, rmin, step, "tf")))
    theirs = DeepmdPot(str(pb))
    rows = []
    for geo in geos:
        a, b = outputs(ours, geo), outputs(theirs, geo)
        vs = errors(outputs(on_tf_tables, geo), b, geo)
        rows.append({"case": geo.key, "minidp_on_tf_tables_vs_deepmd": vs, "minidp_vs_deepmd": errors(a, b, geo),
                     "rounded_vs_deepmd": errors(outputs(rounded, geo), b, geo),
                     "passed": all(v <= args.tol for v in vs.values()),
                     "minidp_minus_exact": errors(a, exact[geo.key][0], geo),
                     "deepmd_minus_exact": errors(b, exact[geo.key][1], geo)})
    return {"step": step, "tables": table_agreement(args.model.with_suffix(".dp"), step), "cases": rows}


def markdown(results: list[dict]) -> str:
    lines = ["# Compressed models: minidp against `dp --tf compress`", ""]
    for r in results:
        t = r["tables"]
        lines += [f"## step {r['step']:g}", "",
                  f"Tables against deepmd-kit's `enable_compression` (min_nbor_dist {t['min_nbor_dist']:.6g} A, "
                  f"bounds {t['bounds']}): compress_info equal: {t['info_equal']}; every coefficient equal: "
                  f"{t['coefficients_equal']}; max |a_k - a_k'| / max |a_k'| by order k: "
                  + ", ".join(f"{x:.1e}" for x in t["rel_difference_by_order"]), ""]
        for kind, title in (("minidp_on_tf_tables_vs_deepmd", "minidp on the .pb's tables - deepmd-kit TF compressed"),
                            ("minidp_vs_deepmd", "minidp compressed (its own tables, TF's range) - deepmd-kit TF "
                             "compressed"),
                            ("rounded_vs_deepmd", "correctly rounded tables (TF's range) - deepmd-kit TF compressed"),
                            ("minidp_minus_exact", "minidp: compressed - exact"),
                            ("deepmd_minus_exact", "deepmd-kit: compressed - exact")):
            lines += [f"{title} (max abs; e, v per atom):", "", "| case | " + " | ".join(QUANTITIES) + " |",
                      "|---" * (len(QUANTITIES) + 1) + "|"]
            lines += ["| " + c["case"] + " | " + " | ".join(f"{c[kind].get(q, float('nan')):.1e}" for q in QUANTITIES)
                      + " |" for c in r["cases"]]
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from deepmd.infer import DeepPot as DeepmdPot

    from minidp import DeepPot
    from minidp.io.outputs import atomic_path

    args = build_parser().parse_args(argv)
    exact_ours = DeepPot(args.model.with_suffix(".dp"))
    frames, _ = load_frames(args.data, exact_ours.get_type_map(), args.nframes)
    cfg = exact_ours.model.descriptor.config
    geos, _ = geometries(frames, cfg.rcut, cfg.sel)
    exact_theirs = DeepmdPot(str(args.model))
    exact = {g.key: (outputs(exact_ours, g), outputs(exact_theirs, g)) for g in geos}
    results = [run_step(step, geos, exact, args) for step in args.steps]
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(results)
    with atomic_path(args.out / "report.md") as tmp:
        tmp.write_text(text)
    with atomic_path(args.out / "report.json") as tmp:
        tmp.write_text(json.dumps(results, indent=1))
    print(text)
    return 0 if all(c["passed"] for r in results for c in r["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
