//! Checks the deterministic parts of the augmentation against an independent reference:
//! `tests/reference/augment_reference.py` recomputes fixed crop boxes with PIL and fixed colour
//! parameters with `torchvision.transforms.functional` on the same inputs.
//!
//! Needs a Python with torch, torchvision, numpy and PIL: `BT_PYTHON`, else `python3` on PATH
//! (`source scripts/env.sh` puts the project venv first). Without one the test prints why and
//! passes only if `BT_SKIP_PYTHON_REFERENCE=1` is set; otherwise it fails.
//!
//! Tolerances:
//! - resize: both round and clip the intermediate (after the horizontal pass) to 8 bits, but PIL
//!   accumulates in fixed point (22-bit coefficients) and bt in f32, so a value sitting at x.5 can
//!   round either way: ±1 level, never more.
//! - colour stage: same float32 formulas in a different order of operations (bt's separable blur
//!   vs torchvision's 2-D kernel, closed-form HSV→RGB); after normalization (÷0.225) float32
//!   rounding stays far below 1e-4, while one 8-bit level is 0.017.
use std::path::PathBuf;
use std::process::Command;

use bt_worker::data::augment::{AugmentConfig, CropBox, Jitter, ViewSample};
use bt_worker::data::colour_cpu::{colour_view, ColourScratch};
use bt_worker::data::colour_device::device_stage;
use bt_worker::data::resample::{resample_chw, Filter};
use bt_worker::data::{Source, SyntheticSource};
use serde_json::json;

fn python() -> Option<PathBuf> {
    let py = std::env::var_os("BT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("python3"));
    let ok = Command::new(&py)
        .args(["-c", "import torch, torchvision, numpy, PIL"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    ok.then_some(py)
}

fn jitter(order: [u8; 4], b: f32, c: f32, s: f32, h: f32) -> Option<Jitter> {
    Some(Jitter {
        order,
        brightness: b,
        contrast: c,
        saturation: s,
        hue: h,
    })
}

#[test]
fn augmentation_matches_pil_and_torchvision() {
    let Some(py) = python() else {
        let msg = "no python with torch+torchvision (set BT_PYTHON or source scripts/env.sh)";
        if std::env::var("BT_SKIP_PYTHON_REFERENCE").as_deref() == Ok("1") {
            eprintln!("SKIPPED augment reference: {msg}");
            return;
        }
        panic!("{msg}; set BT_SKIP_PYTHON_REFERENCE=1 to skip");
    };
    let dir = tempfile::tempdir().unwrap();
    let src = SyntheticSource::new(1, 61, 83, 3, 5).unwrap();
    let img = src.get(0).unwrap();
    std::fs::write(dir.path().join("img.bin"), &img.data).unwrap();

    // Crop + resize + flip: downscale, upscale, mixed, identity, full image.
    let boxes = [
        (3, 5, 50, 70, 24, false),
        (10, 20, 9, 12, 32, true),
        (0, 0, 61, 40, 32, false),
        (7, 9, 32, 32, 32, true),
        (0, 0, 61, 83, 28, false),
        (30, 41, 31, 20, 224, false),
    ];
    let mut ours = Vec::new();
    let mut resize = Vec::new();
    for (top, left, h, w, size, flip) in boxes {
        let mut out = vec![0u8; 3 * size * size];
        let bx = CropBox {
            top,
            left,
            height: h,
            width: w,
        };
        resample_chw(&img, bx, size, size, flip, Filter::Bicubic, &mut out);
        ours.extend_from_slice(&out);
        resize.push(json!({"top": top, "left": left, "h": h, "w": w, "size": size, "flip": flip}));
    }
    std::fs::write(dir.path().join("ours_resize.bin"), &ours).unwrap();

    // Device stage on six 32x32 views with fixed parameters.
    let size = 32usize;
    let cfg = AugmentConfig {
        blur_kernel: Some(7),
        ..AugmentConfig::small(size)
    };
    let boxes = [
        (0, 0, 61, 83),
        (5, 5, 30, 30),
        (10, 30, 40, 50),
        (0, 20, 61, 45),
        (20, 0, 41, 60),
        (1, 2, 50, 50),
    ];
    let plain = |i: usize| ViewSample {
        crop: CropBox {
            top: boxes[i].0,
            left: boxes[i].1,
            height: boxes[i].2,
            width: boxes[i].3,
        },
        flip: i % 2 == 1,
        jitter: None,
        grayscale: false,
        blur_sigma: None,
        solarize: false,
        erase: None,
    };
    let mut samples: Vec<ViewSample> = (0..6).map(plain).collect();
    samples[0].jitter = jitter([0, 1, 2, 3], 1.3, 0.7, 1.15, 0.05);
    samples[1].jitter = jitter([3, 2, 1, 0], 0.65, 1.35, 0.85, -0.08);
    samples[2].grayscale = true;
    samples[3].blur_sigma = Some(1.3);
    samples[4].jitter = jitter([1, 3, 0, 2], 1.1, 1.2, 0.8, 0.1);
    samples[4].solarize = true;
    samples[5].jitter = jitter([2, 0, 3, 1], 0.9, 0.75, 1.2, -0.03);
    samples[5].grayscale = true;
    samples[5].blur_sigma = Some(0.4);
    samples[5].solarize = true;
    let mut views = vec![0u8; 6 * 3 * size * size];
    for (i, s) in samples.iter().enumerate() {
        let out = &mut views[i * 3 * size * size..(i + 1) * 3 * size * size];
        resample_chw(&img, s.crop, size, size, s.flip, Filter::Bicubic, out);
    }
    let t = tch::Tensor::from_slice(&views).view([6, 3, size as i64, size as i64]);
    let y = device_stage(&cfg, &t, &samples).unwrap();
    let y: Vec<f32> = Vec::try_from(y.flatten(0, -1)).unwrap();
    let bytes: Vec<u8> = y.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(dir.path().join("views.bin"), &views).unwrap();
    std::fs::write(dir.path().join("ours_color.bin"), bytes).unwrap();
    let js: Vec<_> = samples
        .iter()
        .map(|s| {
            json!({
                "jitter": s.jitter.map(|j| json!({"order": j.order, "brightness": j.brightness,
                    "contrast": j.contrast, "saturation": j.saturation, "hue": j.hue})),
                "grayscale": s.grayscale,
                "blur_sigma": s.blur_sigma,
                "solarize": s.solarize,
            })
        })
        .collect();
    let case = json!({
        "height": img.height, "width": img.width, "resize": resize,
        "n": 6, "size": size, "samples": js, "blur_kernel": cfg.blur_kernel_size(),
        "mean": cfg.mean, "std": cfg.std,
    });
    std::fs::write(dir.path().join("case.json"), case.to_string()).unwrap();

    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/augment_reference.py");
    let judge = || -> serde_json::Value {
        let out = Command::new(&py)
            .arg(&script)
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "reference script failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
    };
    let r = judge();
    eprintln!("reference (tensor colour stage): {r}");
    assert!(r["resize_max"].as_i64().unwrap() <= 1, "{r}");
    assert!(r["color_max"].as_f64().unwrap() < 1e-4, "{r}");

    // The fused CPU colour stage (what CPU training runs), judged by the same reference.
    let per = 3 * size * size;
    let mut fused = vec![0f32; 6 * per];
    let mut scratch = ColourScratch::default();
    for (i, s) in samples.iter().enumerate() {
        let (src, dst) = (
            &views[i * per..(i + 1) * per],
            &mut fused[i * per..(i + 1) * per],
        );
        colour_view(&cfg, s, src, size, dst, &mut scratch);
    }
    let bytes: Vec<u8> = fused.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(dir.path().join("ours_color.bin"), bytes).unwrap();
    let r = judge();
    eprintln!("reference (fused CPU colour stage): {r}");
    assert!(r["color_max"].as_f64().unwrap() < 1e-4, "{r}");
}
