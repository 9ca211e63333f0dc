//! HdrHistogram-style output for the probe: the `.hgrm` percentile
//! distribution text and an SVG "latency by percentile" plot with a
//! logarithmic percentile axis, as HdrHistogram's plotter draws it, and
//! stacked time-series panels with marked events (the soak's plot).

use std::fmt::Write as _;

use hdrhistogram::Histogram;

/// One series: (percentile as a fraction, value in µs).
pub type Series = Vec<(f64, f64)>;

/// The `.hgrm` text for a histogram of nanosecond values, printed in µs.
pub fn hgrm(h: &Histogram<u64>) -> String {
    let mut s = String::new();
    let _ =
        writeln!(s, "{:>12} {:>14} {:>10} {:>14}\n", "Value", "Percentile", "TotalCount", "1/(1-Percentile)");
    let mut total = 0u64;
    for v in h.iter_quantiles(5) {
        total += v.count_since_last_iteration();
        let q = v.quantile_iterated_to();
        let inv = if q < 1.0 { format!("{:>14.2}", 1.0 / (1.0 - q)) } else { String::new() };
        let _ =
            writeln!(s, "{:>12.3} {:>14.12} {:>10} {inv}", v.value_iterated_to() as f64 / 1000.0, q, total);
    }
    let _ = writeln!(
        s,
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]",
        h.mean() / 1000.0,
        h.stdev() / 1000.0
    );
    let _ = writeln!(s, "#[Max     = {:>12.3}, Total count    = {:>12}]", h.max() as f64 / 1000.0, h.len());
    let _ = writeln!(s, "#[Unit    = microseconds]");
    s
}

/// Parses `.hgrm` text back into a series.
pub fn parse_hgrm(text: &str) -> Series {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let v: f64 = it.next()?.parse().ok()?;
            let q: f64 = it.next()?.parse().ok()?;
            Some((q, v))
        })
        .collect()
}

/// A series from a histogram of nanosecond values.
pub fn series(h: &Histogram<u64>) -> Series {
    h.iter_quantiles(5).map(|v| (v.quantile_iterated_to(), v.value_iterated_to() as f64 / 1000.0)).collect()
}

const COLORS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"];

/// An SVG plot of latency (µs, linear y) by percentile (log x: 0, 90, 99, … 99.999 %).
pub fn svg(title: &str, series: &[(String, Series)]) -> String {
    let (w, h, ml, mr, mt, mb) = (900.0, 520.0, 80.0, 30.0, 50.0, 60.0);
    let max_x = 5.0_f64; // 1/(1-p) up to 10^5 (99.999 %)
    let x_of = |q: f64| -> f64 {
        let inv = if q >= 1.0 { 10f64.powf(max_x) } else { 1.0 / (1.0 - q) };
        ml + (inv.log10().clamp(0.0, max_x) / max_x) * (w - ml - mr)
    };
    let y_max = series.iter().flat_map(|(_, s)| s.iter().map(|p| p.1)).fold(1.0_f64, f64::max) * 1.05;
    let y_of = |v: f64| -> f64 { h - mb - (v / y_max) * (h - mt - mb) };
    let mut s = svg_open(w, h, 12, title, 16);
    for (i, label) in ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"].iter().enumerate() {
        let x = ml + (i as f64 / max_x) * (w - ml - mr);
        let _ = writeln!(
            s,
            r##"<line x1="{x}" y1="{mt}" x2="{x}" y2="{}" stroke="#ddd"/><text x="{x}" y="{}" text-anchor="middle">{label}</text>"##,
            h - mb,
            h - mb + 18.0
        );
    }
    for i in 0..=5 {
        let v = y_max * i as f64 / 5.0;
        let y = y_of(v);
        let _ = writeln!(
            s,
            r##"<line x1="{ml}" y1="{y}" x2="{}" y2="{y}" stroke="#eee"/><text x="{}" y="{}" text-anchor="end">{v:.0}</text>"##,
            w - mr,
            ml - 6.0,
            y + 4.0
        );
    }
    let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">percentile</text>"#, w / 2.0, h - 15.0);
    let _ = writeln!(
        s,
        r#"<text x="20" y="{}" transform="rotate(-90 20 {})" text-anchor="middle">latency (µs)</text>"#,
        h / 2.0,
        h / 2.0
    );
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let path: Vec<String> = pts.iter().map(|&(q, v)| format!("{:.1},{:.1}", x_of(q), y_of(v))).collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        let ly = mt + 10.0 + i as f64 * 18.0;
        let _ = writeln!(
            s,
            r#"<rect x="{}" y="{}" width="14" height="4" fill="{c}"/><text x="{}" y="{}">{}</text>"#,
            ml + 15.0,
            ly - 4.0,
            ml + 35.0,
            ly,
            esc(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// An SVG's opening tag, white background and centred title.
fn svg_open(w: f64, h: f64, font: u32, title: &str, title_font: u32) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="{font}">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="25" font-size="{title_font}" text-anchor="middle">{}</text>"#,
        w / 2.0,
        esc(title)
    );
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// One panel of [`timeseries`]: named series sharing a y axis.
pub struct Panel {
    /// Panel title (with its unit).
    pub title: String,
    /// Logarithmic y axis (values ≤ 0 are left out).
    pub log: bool,
    /// (name, value per x); NaN values are gaps in the line.
    pub series: Vec<(String, Vec<f64>)>,
}

/// Panels stacked over one time axis (seconds), each event drawn as a
/// dashed vertical line with its label across every panel.
pub fn timeseries(title: &str, x: &[f64], panels: &[Panel], events: &[(f64, String)]) -> String {
    let (w, ph, ml, mr, mt, gap) = (1000.0, 170.0, 80.0, 150.0, 50.0, 40.0);
    let h = mt + panels.len() as f64 * (ph + gap) + 30.0;
    let x_max = x.iter().copied().fold(1.0_f64, f64::max);
    let x_of = |t: f64| ml + t / x_max * (w - ml - mr);
    let mut s = svg_open(w, h, 11, title, 15);
    for (pi, p) in panels.iter().enumerate() {
        let top = mt + pi as f64 * (ph + gap);
        let bottom = top + ph;
        let vals = p.series.iter().flat_map(|(_, v)| v.iter().copied()).filter(|v| v.is_finite());
        let vals: Vec<f64> = if p.log { vals.filter(|&v| v > 0.0).collect() } else { vals.collect() };
        let hi = vals.iter().copied().fold(f64::MIN, f64::max);
        let (lo, hi) = if p.log {
            let lo = vals.iter().copied().fold(f64::MAX, f64::min);
            if vals.is_empty() {
                (0.0, 1.0)
            } else {
                (lo.log10().floor(), hi.log10().ceil().max(lo.log10().floor() + 1.0))
            }
        } else {
            (0.0, if vals.is_empty() || hi <= 0.0 { 1.0 } else { hi * 1.1 })
        };
        let y_of = |v: f64| {
            let v = if p.log { v.log10() } else { v };
            bottom - (v - lo) / (hi - lo) * ph
        };
        let _ = writeln!(
            s,
            r##"<rect x="{ml}" y="{top}" width="{}" height="{ph}" fill="none" stroke="#999"/><text x="{ml}" y="{}" font-size="12">{}</text>"##,
            w - ml - mr,
            top - 6.0,
            esc(&p.title)
        );
        for i in 0..=4 {
            let v = lo + (hi - lo) * i as f64 / 4.0;
            let y = bottom - ph * i as f64 / 4.0;
            let label = if p.log { fmt_num(10f64.powf(v)) } else { fmt_num(v) };
            let _ = writeln!(
                s,
                r##"<line x1="{ml}" y1="{y}" x2="{}" y2="{y}" stroke="#eee"/><text x="{}" y="{}" text-anchor="end">{label}</text>"##,
                w - mr,
                ml - 5.0,
                y + 4.0
            );
        }
        for (si, (name, v)) in p.series.iter().enumerate() {
            let c = COLORS[si % COLORS.len()];
            // Break the line where a value is missing (a process was down).
            let mut run: Vec<String> = Vec::new();
            let flush = |run: &mut Vec<String>, s: &mut String| {
                if run.len() > 1 {
                    let _ = writeln!(
                        s,
                        r#"<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{}"/>"#,
                        run.join(" ")
                    );
                }
                run.clear();
            };
            for (&t, &y) in x.iter().zip(v.iter()) {
                if y.is_finite() && (!p.log || y > 0.0) {
                    run.push(format!("{:.1},{:.1}", x_of(t), y_of(y)));
                } else {
                    flush(&mut run, &mut s);
                }
            }
            flush(&mut run, &mut s);
            let ly = top + 14.0 + si as f64 * 15.0;
            let _ = writeln!(
                s,
                r#"<rect x="{}" y="{}" width="14" height="4" fill="{c}"/><text x="{}" y="{}">{}</text>"#,
                w - mr + 10.0,
                ly - 4.0,
                w - mr + 30.0,
                ly,
                esc(name)
            );
        }
        for (t, label) in events {
            let xe = x_of(*t);
            let _ = writeln!(
                s,
                r##"<line x1="{xe:.1}" y1="{top}" x2="{xe:.1}" y2="{bottom}" stroke="#d62728" stroke-dasharray="4,3"/>"##
            );
            if pi == 0 {
                let _ = writeln!(
                    s,
                    r##"<text x="{:.1}" y="{}" fill="#d62728" font-size="10">{}</text>"##,
                    xe + 2.0,
                    top + 10.0,
                    esc(label)
                );
            }
        }
    }
    let base = mt + panels.len() as f64 * (ph + gap) - gap;
    for i in 0..=6 {
        let t = x_max * i as f64 / 6.0;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{:.0}</text>"#,
            x_of(t),
            base + 15.0,
            t
        );
    }
    let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">seconds</text>"#, w / 2.0, base + 30.0);
    s.push_str("</svg>\n");
    s
}

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 10.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 0.1 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}
