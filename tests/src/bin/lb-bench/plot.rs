//! docs/benchmarks.png: the live forwarding rate of (a), (b), (c) and the
//! per-packet cost of each frame class, drawn with plotters (bitmap backend, the
//! DejaVu Sans font from Debian's fonts-dejavu-core through ab_glyph: no fontconfig).

use std::path::Path;

use plotters::{prelude::*, style::FontStyle};

use crate::{live::Variant, packets::PacketRow};

const FONT_FILE: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const BLUE: RGBColor = RGBColor(0x2b, 0x6c, 0xb0);
const GREY: RGBColor = RGBColor(0x88, 0x88, 0x88);
const ORANGE: RGBColor = RGBColor(0xdd, 0x7a, 0x1f);

fn register_font() -> Result<(), String> {
    static ONCE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let bytes = std::fs::read(FONT_FILE).map_err(|e| {
            format!("{FONT_FILE}: {e} (cargo xtask setup installs fonts-dejavu-core)")
        })?;
        plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            Box::leak(bytes.into_boxed_slice()),
        )
        .map_err(|_| format!("{FONT_FILE}: not a usable font"))
    })
    .clone()
}

/// Draws both panels into a PNG at `path`.
pub fn draw(path: &Path, live: &[Variant], rows: &[PacketRow]) -> Result<(), String> {
    register_font()?;
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let root = BitMapBackend::new(path, (1640, 620)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let (left, right) = root.split_horizontally(660);

    // Left: forwarded Mpps, median bar and each run as a dot.
    let top = live
        .iter()
        .flat_map(|v| v.pps.iter())
        .fold(0.0f64, |a, &b| a.max(b))
        / 1e6
        * 1.25;
    let mut c = ChartBuilder::on(&left)
        .caption("Live forwarding rate, veth, native XDP", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(60)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (0..live.len() as i32 - 1).into_segmented(),
            0.0..top.max(0.1),
        )
        .map_err(|x| e(&x))?;
    let short = ["(a) MAC swap", "(b) lb_xdp", "(c) nftables", "(d) ipip", "(e) gue"];
    c.configure_mesh()
        .disable_x_mesh()
        .y_desc("Mpps forwarded (median; dots: runs)")
        .x_labels(live.len())
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => short
                .get(*i as usize)
                .map_or(String::new(), |s| s.to_string()),
            _ => String::new(),
        })
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 16))
        .draw()
        .map_err(|x| e(&x))?;
    c.draw_series(live.iter().enumerate().map(|(i, v)| {
        let color = if matches!(v.short, "b" | "d" | "e") { BLUE } else { GREY };
        let i = i as i32;
        let mut bar = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), v.mpps()),
            ],
            color.mix(0.8).filled(),
        );
        bar.set_margin(0, 0, 25, 25);
        bar
    }))
    .map_err(|x| e(&x))?;
    c.draw_series(live.iter().enumerate().map(|(i, v)| {
        Text::new(
            format!("{:.2}", v.mpps()),
            (SegmentValue::CenterOf(i as i32), v.mpps() + top * 0.05),
            ("sans-serif", 18).into_font().color(&BLACK),
        )
    }))
    .map_err(|x| e(&x))?;
    c.draw_series(live.iter().enumerate().flat_map(|(i, v)| {
        v.pps.iter().map(move |p| {
            Circle::new(
                (SegmentValue::CenterOf(i as i32), p / 1e6),
                4,
                ORANGE.filled(),
            )
        })
    }))
    .map_err(|x| e(&x))?;

    // Right: ns/packet per frame class (BPF_PROG_TEST_RUN), horizontal bars.
    let n = rows.len() as i32;
    let max = rows.iter().map(|r| r.ns).fold(0.0f64, f64::max) * 1.2;
    let labels: Vec<String> = rows
        .iter()
        .map(|r| {
            let rep1 = if r.method.contains("repeat 1)") {
                " [repeat 1]"
            } else {
                ""
            };
            format!("{}{rep1}", r.class)
        })
        .collect();
    let mut c = ChartBuilder::on(&right)
        .caption("Per-packet cost, BPF_PROG_TEST_RUN", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(430)
        .build_cartesian_2d(0.0..max.max(1.0), (0..n - 1).into_segmented())
        .map_err(|x| e(&x))?;
    c.configure_mesh()
        .disable_y_mesh()
        .x_desc("ns/packet (median)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_labels(rows.len())
        .y_label_formatter(&|y| match y {
            // Row 0 at the top.
            SegmentValue::CenterOf(i) => labels
                .get((n - 1 - *i) as usize)
                .cloned()
                .unwrap_or_default(),
            _ => String::new(),
        })
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()
        .map_err(|x| e(&x))?;
    c.draw_series(rows.iter().enumerate().map(|(k, r)| {
        let i = n - 1 - k as i32;
        let color = if r.class.starts_with("reference") {
            GREY
        } else {
            BLUE
        };
        let mut bar = Rectangle::new(
            [
                (0.0, SegmentValue::Exact(i)),
                (r.ns, SegmentValue::Exact(i + 1)),
            ],
            color.mix(0.8).filled(),
        );
        bar.set_margin(6, 6, 0, 0);
        bar
    }))
    .map_err(|x| e(&x))?;
    c.draw_series(rows.iter().enumerate().map(|(k, r)| {
        Text::new(
            format!("{:.0}", r.ns),
            (r.ns + max * 0.01, SegmentValue::CenterOf(n - 1 - k as i32)),
            ("sans-serif", 14).into_font().color(&BLACK),
        )
    }))
    .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}
