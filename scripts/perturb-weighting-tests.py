"""Checks that the fixture tests of the LibMTL methods, Auto-λ and AdaLoRA's allocator (issue 30) can fail:
perturbs each method's update by 1% (RLW: its samples by 5%; AdaLoRA: the uncertainty's weight in the scores),
runs that method's tests, expects a failure, and restores the file. Prints one line a
method. Run from the repository root: python3 scripts/perturb-weighting-tests.py"""
import pathlib
import subprocess

CASES = [
    ("crates/mtl-train/src/surgery/mgda.rs",
     "min_norm_weights(&scaled).iter().zip(&normaliser).map(|(w, n)| w / n).collect()",
     "min_norm_weights(&scaled).iter().zip(&normaliser).map(|(w, n)| 1.01 * w / n).collect()", "surgery::mgda"),
    ("crates/mtl-train/src/surgery/imtl.rs", "let first = 1.0 - rest.iter().sum::<f64>();",
     "let first = 1.01 - rest.iter().sum::<f64>();", "surgery::imtl"),
    ("crates/mtl-train/src/surgery/aligned.rs", "smallest.sqrt()\n", "1.01 * smallest.sqrt()\n", "surgery::aligned"),
    ("crates/mtl-train/src/surgery/nash.rs", "let scale = frobenius.sqrt();",
     "let scale = frobenius.sqrt() / 1.01;", "surgery::nash"),
    ("crates/mtl-train/src/surgery/db_mtl.rs", "*o += scale * a;", "*o += 1.01 * scale * a;", "surgery::db_mtl"),
    ("crates/mtl-train/src/weighting/famo.rs", "s.logits[i] -= self.lr / c1", "s.logits[i] -= 1.01 * self.lr / c1",
     "weighting::famo"),
    ("crates/mtl-train/src/weighting/auto_lambda.rs", "-alpha * (p - minus", "-1.01 * alpha * (p - minus",
     "weighting::auto_lambda"),
    ("crates/mtl-train/src/adalora.rs", "self.ipt[i] * self.unc[i]", "self.ipt[i] * self.unc[i].sqrt()", "adalora"),
    ("crates/mtl-train/src/weighting/rlw.rs", "let weights = softmax(&samples);",
     "let weights = softmax(&samples.iter().map(|s| s * 1.05).collect::<Vec<_>>());", "weighting::rlw"),
]

failed_to_fail = 0
for path, old, new, test in CASES:
    file = pathlib.Path(path)
    source = file.read_text()
    assert old in source, f"{path}: the line to perturb moved"
    file.write_text(source.replace(old, new, 1))
    try:
        r = subprocess.run(["cargo", "test", "--release", "-q", "-p", "mtl-train", "--lib", test],
                           capture_output=True, text=True)
    finally:
        file.write_text(source)
    print(f"{test}: {'fails when perturbed' if r.returncode != 0 else 'STILL PASSES when perturbed'}")
    failed_to_fail += r.returncode == 0
raise SystemExit(failed_to_fail)
