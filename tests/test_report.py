"""Run report (engine/report.py, rules/report.smk, report/*.rst).

Fast part: known answers of the pure summaries, binning and HTML; byte-identical PNGs; the CLI on tiny
partitions built here. Slow part (one workflow run): the default workflow into a scratch data root, then
``snakemake --report`` must embed every figure with its caption and the run's identities.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely
from shapely.geometry import Polygon, box

from engine import report as R

PNG_SIG = b"\x89PNG\r\n\x1a\n"
BIG = np.uint64(2**64 - 5)  # a merchant id above 2^63: must never go through a signed type


# ----------------------------------------------------------------------------------------- summaries


def test_merchant_summary_counts_outlets_countries_and_multi_flag_u64_safe():
    mid = np.array([BIG, 7, BIG, 7, 3, BIG, 7], dtype=np.uint64)
    iso = np.array(["DE", "FR", "FR", "FR", "GB", "DE", "IT"], dtype=object)
    multi = np.array([True, True, True, True, False, True, True])
    ms = R.merchant_summary(mid, iso, multi)
    assert ms.merchant_id.dtype == np.uint64
    assert ms.merchant_id.tolist() == [3, 7, 2**64 - 5]
    assert ms.outlets.tolist() == [1, 3, 3]
    assert ms.countries.tolist() == [1, 2, 2]  # 7: FR, IT; BIG: DE, FR
    assert ms.is_multi.tolist() == [False, True, True]


def test_share_summary_is_poisson_binomial_known_answer():
    pi = np.array([0.1, 0.5, 0.9, 0.5])
    ss = R.share_summary(np.array([False, True, True, False]), pi)
    assert ss.observed_multi == 0.5 and ss.expected_multi == 0.5
    sd = math.sqrt(0.09 + 0.25 + 0.09 + 0.25) / 4
    assert ss.sd == pytest.approx(sd, rel=1e-15)
    assert ss.z == 0.0
    ss = R.share_summary(np.array([True, True, True, True]), pi)
    assert ss.z == pytest.approx(0.5 / sd)
    assert math.isnan(R.share_summary(np.array([True]), np.array([1.0])).z)  # sd 0: no z


def test_top_countries_order_ties_and_home_split():
    mid = np.array([1, 1, 2, 2, 3, 4, 4], dtype=np.uint64)
    home = np.array(["US", "US", "DE", "DE", "FR", "US", "US"], dtype=object)
    legal = np.array(["US", "DE", "DE", "DE", "FR", "US", "FR"], dtype=object)
    rows = R.top_countries(mid, home, legal, k=3)
    assert [r.iso for r in rows] == ["DE", "FR", "US"]  # DE 3; FR 2 and US 2 tie -> ISO order
    de = rows[0]
    assert (de.outlets, de.home_outlets, de.foreign_outlets, de.merchants) == (3, 2, 1, 2)
    fr = rows[1]
    assert (fr.outlets, fr.home_outlets, fr.foreign_outlets, fr.merchants) == (2, 1, 1, 2)
    assert len(R.top_countries(mid, home, legal, k=1)) == 1
    assert R.top_countries(mid[:0], home[:0], legal[:0]) == []


def test_iso_colour_depends_on_the_code_only():
    a = R.iso_colour_index(np.array(["BE", "BG", "DE", "ZZ", "AA"], dtype=object))
    b = R.iso_colour_index(np.array(["DE"], dtype=object))
    assert a[2] == b[0]  # same code, same colour, whatever else is on the map
    assert a[3] == ((25 * 26 + 25) * 7) % 20 and a[4] == 0
    assert a[0] != a[1]  # alphabetically adjacent codes get different colours
    assert ((a >= 0) & (a < 20)).all()


# ----------------------------------------------------------------------------------------- tile binning


def _grid_tiles(rows, cols, dx=0.5, lon0=-10.0, lat0=20.0):
    rows, cols = np.asarray(rows), np.asarray(cols)
    return rows, cols, lon0 + (cols + 0.5) * dx, lat0 - (rows + 0.5) * dx


def test_bin_tile_weights_sums_blocks_and_places_the_extent():
    r, c, lon, lat = _grid_tiles([0, 0, 1, 3, 3], [0, 1, 1, 4, 5])
    share = np.array([0.1, 0.2, 0.3, 0.0, 0.4])
    bw = R.bin_tile_weights(r, c, lon, lat, share, countries=2, max_width=3)
    assert bw.factor == 2 and bw.image.shape == (2, 3)  # 6 columns spanned -> blocks of 2x2
    assert bw.image[0, 0] == pytest.approx(0.6)
    assert np.isnan(bw.image[0, 1]) and np.isnan(bw.image[0, 2]) and np.isnan(bw.image[1, 0])
    assert bw.image[1, 2] == pytest.approx(0.4)
    assert bw.extent == pytest.approx((-10.0, -7.0, 18.0, 20.0))
    assert bw.cell_deg == pytest.approx((0.5, 0.5))
    assert (bw.tiles, bw.countries) == (5, 2)
    one = R.bin_tile_weights(r, c, lon, lat, share, max_width=1000)
    assert one.factor == 1 and np.nansum(one.image) == pytest.approx(1.0)


def test_join_tile_weights_aligned_and_unaligned_agree():
    idx = pa.table({"country_iso": ["AA", "AA", "BB"], "tile_id": pa.array([1, 5, 2], pa.uint64()),
                    "raster_row": [0, 1, 0], "raster_col": [1, 1, 2], "centroid_lon": [1.0, 1.0, 2.0],
                    "centroid_lat": [0.0, -1.0, 0.0]})
    w = pa.table({"country_iso": ["AA", "AA", "BB"], "tile_id": pa.array([1, 5, 2], pa.uint64()),
                  "weight_fp": [400, 600, 1000], "dp": pa.array([3, 3, 3], pa.int32())})
    aligned = R.join_tile_weights(idx, w)
    shuffled = R.join_tile_weights(idx, w.take([2, 0, 1]))
    assert aligned.select(shuffled.column_names).equals(shuffled)
    assert aligned["weight_fp"].to_pylist() == [400, 600, 1000]


def test_outline_segments_split_at_the_antimeridian_and_keep_holes():
    shell = [(170, -10), (190, -10), (190, 10), (170, 10)]  # crosses 180 -> two pieces within [-180, 180]
    holed = Polygon([(0, 0), (10, 0), (10, 10), (0, 10)], [[(2, 2), (4, 2), (4, 4), (2, 4)]])
    segs = R.outline_segments(["ZZ", "AA", None], [Polygon(shell), holed, box(0, 0, 1, 1)], tolerance=0.0)
    assert len(segs) == 4  # AA shell + hole, ZZ two pieces; the feature without ISO is skipped
    allx = np.concatenate([s[:, 0] for s in segs])
    assert allx.min() >= -180 and allx.max() <= 180
    assert all(s.shape[1] == 2 and len(s) >= 4 for s in segs)


# ----------------------------------------------------------------------------------------- figures


def _tiny_ms():
    return R.merchant_summary(np.array([1, 2, 2, 3, 3, 3], dtype=np.uint64),
                              np.array(["DE", "DE", "FR", "GB", "GB", "GB"], dtype=object),
                              np.array([False, True, True, True, True, True]))


def test_png_bytes_are_stable_and_carry_no_software_or_user_rc():
    import matplotlib as mpl

    ms = _tiny_ms()
    a = R.png_bytes(R.fig_outlets_per_merchant(ms, tag="seed=1"))
    b = R.png_bytes(R.fig_outlets_per_merchant(ms, tag="seed=1"))
    assert a.startswith(PNG_SIG) and a == b
    assert b"Software" not in a and b"matplotlib" not in a.lower()
    with mpl.rc_context({"lines.linewidth": 9.0, "font.size": 30, "axes.facecolor": "red"}):
        c = R.png_bytes(R.fig_outlets_per_merchant(ms, tag="seed=1"))
    assert c == a  # the caller's rcParams do not leak into the report
    assert R.png_bytes(R.fig_outlets_per_merchant(ms, tag="seed=2")) != a  # the footer is drawn


def test_every_figure_renders():
    ms = _tiny_ms()
    pi = np.array([0.2, 0.7, 0.9])
    ss = R.share_summary(ms.is_multi, pi)
    rows = R.top_countries(np.array([1, 2], np.uint64), np.array(["DE", "DE"], object), np.array(["DE", "FR"], object))
    r, c, lon, lat = _grid_tiles([0, 1], [0, 3])
    bw = R.bin_tile_weights(r, c, lon, lat, np.array([0.0, 1.0]))
    segs = R.outline_segments(["AA"], [box(-5, 10, 5, 15)])
    figs = [R.fig_single_vs_multi(ss, pi), R.fig_countries_per_merchant(ms), R.fig_top_countries(rows, 2, 2),
            R.fig_site_map(np.array([0.0, 1.0]), np.array([12.0, 13.0]), np.array(["AA", "BB"], object), segs),
            R.fig_tile_weights(bw, segs, basis="uniform")]
    for f in figs:
        assert R.png_bytes(f).startswith(PNG_SIG)


# ----------------------------------------------------------------------------------------- summary page


IDS = {"seed": 7, "1A": {"parameter_hash": "a" * 64, "manifest_fingerprint": "b" * 64, "run_id": "c" * 32},
       "1B": {"parameter_hash": "d" * 64, "manifest_fingerprint": "e" * 64, "run_id": "f" * 32,
              "grid_hash": "1" * 64, "weights_hash": "2" * 64}, "code_digest": "3" * 64}


def _bundle(d: Path, summary: dict, passed: bool) -> Path:
    d.mkdir(parents=True)
    (d / "s9_summary.json").write_text(json.dumps(summary))
    if passed:
        (d / "_passed.flag").write_text("sha256_hex = " + "9" * 64 + "\n")
    return d


def test_summary_html_identities_decisions_and_escaping(tmp_path):
    b1 = _bundle(tmp_path / "1A", {"passed": True, "checks": {"s1_replay": "PASS"}, "failures": [],
                                   "run": {"seed": 7, "manifest_fingerprint": "b" * 64, "decision": "PASS"}}, True)
    b2 = _bundle(tmp_path / "1B", {"passed": False, "failure_codes": ["E901_ROW_MISSING"],
                                   "identity": {"seed": 7, "manifest_fingerprint": "0" * 64},
                                   "failures": [{"code": "E901_ROW_MISSING", "message": "<site> missing"}],
                                   "by_country": {"DE": 1}}, False)
    res = [R.read_s9(b1, "1A", rel_to=tmp_path), R.read_s9(b2, "1B", rel_to=tmp_path)]
    assert res[0].passed and res[0].flag.startswith("sha256_hex = ") and not res[1].passed
    page = R.summary_html(IDS, res)
    for v in ("a" * 64, "b" * 64, "e" * 64, "1" * 64, "2" * 64, "3" * 64, "c" * 32):
        assert v in page
    assert "decision: PASS" in page and "decision: FAIL" in page
    assert "s1_replay" in page and "E901_ROW_MISSING" in page and "1 countries" in page
    assert "&lt;site&gt; missing" in page and "<site>" not in page
    assert R.identities_agree(IDS, "1A", {"seed": 7, "manifest_fingerprint": "b" * 64, "decision": "PASS"}) is True
    assert R.identities_agree(IDS, "1B", {"seed": 7, "manifest_fingerprint": "0" * 64}) is False
    assert R.identities_agree(IDS, "1B", {"other": 1}) is None
    assert page == R.summary_html(IDS, res)  # no clock in the page


def test_report_paths_live_under_reports_and_format():
    assert all(t.startswith("reports/") for t in R.REPORT_PATHS.values())
    p = R.report_path("site_map", seed=3, manifest_fingerprint="ab")
    assert p == "reports/1B/seed=3/fingerprint=ab/site_map.png"
    assert len(set(R.REPORT_PATHS.values())) == len(R.REPORT_PATHS)


# ----------------------------------------------------------------------------------------- CLI on tiny partitions


def _part(d: Path, table: pa.Table) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, d / "part-00000.parquet")
    return d


def test_cli_writes_every_output_deterministically(tmp_path):
    cat = _part(tmp_path / "cat", pa.table({
        "merchant_id": pa.array([1, 2, 2, 2**64 - 5], pa.uint64()), "home_country_iso": ["DE", "FR", "FR", "US"],
        "legal_country_iso": ["DE", "FR", "DE", "US"], "single_vs_multi_flag": [False, True, True, False]}))
    pi = _part(tmp_path / "pi", pa.table({"merchant_id": pa.array([1, 2, 2**64 - 5], pa.uint64()),
                                          "pi": [0.1, 0.6, 0.2]}))
    sites = _part(tmp_path / "sites", pa.table({"legal_country_iso": ["DE", "FR"], "lon_deg": [10.0, 2.0],
                                                "lat_deg": [51.0, 47.0]}))
    ti = _part(tmp_path / "ti", pa.table({"country_iso": ["DE", "DE"], "tile_id": pa.array([1, 2], pa.uint64()),
                                          "raster_row": [0, 0], "raster_col": [0, 1], "centroid_lon": [10.0, 11.0],
                                          "centroid_lat": [51.0, 51.0]}))
    tw = _part(tmp_path / "tw", pa.table({"country_iso": ["DE", "DE"], "tile_id": pa.array([1, 2], pa.uint64()),
                                          "weight_fp": [250000, 750000], "dp": pa.array([6, 6], pa.int32()),
                                          "basis": ["population", "population"]}))
    b1 = _bundle(tmp_path / "b1", {"passed": True}, True)

    def run(out: Path) -> dict[str, str]:
        f = {k: out / f"{k}.png" for k in ("o", "s", "c", "t", "map", "tw")}
        assert R.main(["segment1a", "--catalogue", str(cat), "--pi", str(pi), "--outlets", str(f["o"]), "--share",
                       str(f["s"]), "--countries", str(f["c"]), "--top-countries", str(f["t"]), "--tag", "x"]) == 0
        assert R.main(["sites", "--sites", str(sites), "--out", str(f["map"])]) == 0
        assert R.main(["tile-weights", "--tile-index", str(ti), "--tile-weights", str(tw), "--out", str(f["tw"])]) == 0
        html_out = out / "summary.html"
        assert R.main(["summary", "--identities", json.dumps(IDS), "--bundle", f"1A={b1}", "--bundle",
                       f"1B={tmp_path / 'missing'}", "--out", str(html_out)]) == 0
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in [*f.values(), html_out]}

    a, b = run(tmp_path / "a"), run(tmp_path / "b")
    assert a == b and len(a) == 7
    assert not list((tmp_path / "a").glob(".*.tmp"))  # atomic writes leave no temp file
    page = (tmp_path / "a" / "summary.html").read_text()
    assert "decision: PASS" in page and "decision: FAIL" in page


# ----------------------------------------------------------------------------------------- end to end (slow)


@pytest.mark.slow
def test_workflow_report_embeds_every_figure_with_caption_and_identities(tmp_path):
    from workflow_helpers import REPO, planned_rules, snakemake

    assert 'include: "rules/report.smk"' in (REPO / "Snakefile").read_text(), \
        "Snakefile must include rules/report.smk and add REPORT_TARGETS to rule all"
    root = tmp_path / "run"
    snakemake(root, cores=2)
    files = sorted(p for p in (root / "reports").rglob("*") if p.is_file())
    names = sorted(p.name for p in files)
    assert names == sorted(Path(t).name for t in R.REPORT_PATHS.values())
    assert not [p for p in (root / "data").rglob("*") if p.suffix in (".png", ".html")]
    before = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    for p in files:
        if p.suffix == ".png":
            assert p.read_bytes().startswith(PNG_SIG)

    flags = sorted(root.glob("data/layer1/*/validation/seed=*/fingerprint=*/_passed.flag"))
    fps = [f.parent.name.split("=", 1)[1] for f in flags]
    assert len(fps) == 2
    summary = next(p for p in files if p.name == "run_summary.html").read_text()
    assert summary.count("decision: PASS") == 2 and all(fp in summary for fp in fps)
    assert summary.count("<td>bundle identity == this run</td><td class='v pass'>true</td>") == 2

    out = root / "report.html"
    snakemake(root, extra=["--report", str(out)])
    page = out.read_text()
    for name in names:
        assert name in page, name
    for heading in ("Outlets per merchant", "Single vs multi-site share against the hurdle model",
                    "Legal countries per merchant", "Top legal countries", "Site locations", "Tile weights",
                    "Run identities and S9 results", "Layer-1 engine run report"):
        assert heading in page, heading
    assert all(fp in page for fp in fps)  # captions carry the identities

    # up to date after the run; re-drawing gives the same bytes
    assert planned_rules(snakemake(root, dry_run=True)) == {}
    snakemake(root, extra=["--forcerun", "report_1a_figures", "report_site_map", "report_tile_weights_map",
                           "report_run_summary"])
    after = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    assert after == before
