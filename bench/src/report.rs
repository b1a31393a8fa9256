//! Output: a two-column table on stdout, the JSON document for `--json`, and the
//! latency-by-percentile SVG for `fanout --svg`.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

use crate::stats::Percentiles;

/// A titled list of (figure, value) rows, printed aligned.
#[derive(Default)]
pub struct Table {
    rows: Vec<(String, String)>,
}

impl Table {
    pub fn section(&mut self, title: &str) {
        self.rows.push((format!("== {title} =="), String::new()));
    }

    pub fn row(&mut self, name: &str, value: impl std::fmt::Display) {
        self.rows.push((name.to_string(), value.to_string()));
    }

    /// The latency rows of a µs histogram summary, shown in ms.
    pub fn percentiles(&mut self, prefix: &str, p: &Percentiles) {
        if p.count == 0 {
            self.row(prefix, "no samples");
            return;
        }
        let ms = |us: u64| format!("{:.3} ms", us as f64 / 1000.0);
        self.row(&format!("{prefix} samples"), p.count);
        self.row(&format!("{prefix} p50"), ms(p.p50));
        self.row(&format!("{prefix} p90"), ms(p.p90));
        self.row(&format!("{prefix} p99"), ms(p.p99));
        self.row(&format!("{prefix} p99.9"), ms(p.p999));
        self.row(&format!("{prefix} max"), ms(p.max));
    }

    pub fn print(&self) {
        let w = self
            .rows
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(n, _)| n.len())
            .max()
            .unwrap_or(0);
        for (n, v) in &self.rows {
            if v.is_empty() {
                println!("{n}");
            } else {
                println!("  {n:<w$}  {v}");
            }
        }
    }
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Bytes with a binary unit.
pub fn bytes(n: f64) -> String {
    let a = n.abs();
    if a >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", n / (1024.0 * 1024.0 * 1024.0))
    } else if a >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", n / (1024.0 * 1024.0))
    } else if a >= 1024.0 {
        format!("{:.1} KiB", n / 1024.0)
    } else {
        format!("{n:.0} B")
    }
}

/// A latency-by-percentile plot: x is the percentile on a log scale (0, 90, 99, 99.9 …
/// are equally spaced), y the latency in ms.
pub fn latency_svg(h: &Histogram<u64>, title: &str, subtitle: &str) -> String {
    let (w, ht) = (800.0_f64, 480.0_f64);
    let (l, r, t, b) = (80.0, 40.0, 60.0, 50.0);
    let pw = w - l - r;
    let ph = ht - t - b;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{ht}" viewBox="0 0 {w} {ht}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(s, r#"<rect width="{w}" height="{ht}" fill="white"/>"#);
    let _ = write!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="16">{}</text>"#,
        w / 2.0,
        escape(title)
    );
    let _ = write!(
        s,
        r##"<text x="{}" y="42" text-anchor="middle" fill="#555">{}</text>"##,
        w / 2.0,
        escape(subtitle)
    );
    if h.is_empty() {
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">no samples</text></svg>"#,
            w / 2.0,
            ht / 2.0
        );
        return s;
    }
    // Do not draw beyond the resolution the sample count gives (1/count).
    let xmax = (h.len() as f64).log10().clamp(1.0, 6.0).ceil();
    let ymax_ms = (h.max() as f64 / 1000.0 * 1.1).max(0.001);
    let x_of = |x: f64| l + x / xmax * pw;
    let y_of = |ms: f64| t + ph - ms / ymax_ms * ph;
    // Axes and grid.
    let _ = write!(
        s,
        r##"<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
    );
    for i in 0..=(xmax as u32) {
        let x = x_of(f64::from(i));
        let label = match i {
            0 => "0%".to_string(),
            n => {
                let nines = 100.0 - 100.0 / 10f64.powi(n as i32);
                format!("{}%", trim(nines))
            }
        };
        let _ = write!(
            s,
            r##"<line x1="{x}" y1="{t}" x2="{x}" y2="{}" stroke="#ddd"/><text x="{x}" y="{}" text-anchor="middle">{label}</text>"##,
            t + ph,
            t + ph + 18.0
        );
    }
    for i in 0..=5 {
        let ms = ymax_ms * f64::from(i) / 5.0;
        let y = y_of(ms);
        let _ = write!(
            s,
            r##"<line x1="{l}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
            l + pw,
            l - 6.0,
            y + 4.0,
            trim_ms(ms)
        );
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">percentile</text>"#,
        l + pw / 2.0,
        ht - 10.0
    );
    let _ = write!(
        s,
        r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">latency (ms)</text>"#,
        t + ph / 2.0,
        t + ph / 2.0
    );
    // The curve.
    let mut pts = String::new();
    let steps = 400;
    for i in 0..=steps {
        let x = xmax * f64::from(i) / f64::from(steps);
        let q = (1.0 - 10f64.powf(-x)).min(1.0);
        let v = h.value_at_quantile(q) as f64 / 1000.0;
        let _ = write!(pts, "{:.1},{:.1} ", x_of(x), y_of(v));
    }
    let _ = write!(
        s,
        r##"<polyline fill="none" stroke="#1f6feb" stroke-width="2" points="{pts}"/>"##
    );
    // Marked percentiles.
    for (name, q) in [
        ("p50", 0.5_f64),
        ("p90", 0.9),
        ("p99", 0.99),
        ("p99.9", 0.999),
    ] {
        let x = -(1.0 - q).log10();
        if x > xmax {
            continue;
        }
        let v = h.value_at_quantile(q) as f64 / 1000.0;
        let (px, py) = (x_of(x), y_of(v));
        let _ = write!(
            s,
            r##"<circle cx="{px:.1}" cy="{py:.1}" r="3" fill="#d1242f"/><text x="{:.1}" y="{:.1}" fill="#d1242f">{name} {}</text>"##,
            px + 5.0,
            py - 6.0,
            trim_ms(v)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn trim(v: f64) -> String {
    let s = format!("{v:.4}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn trim_ms(ms: f64) -> String {
    if ms == 0.0 {
        "0".to_string()
    } else if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else if ms >= 1.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.3} ms")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(thousands(12), "12");
        assert_eq!(bytes(2048.0), "2.0 KiB");
    }

    #[test]
    fn svg_is_well_formed_enough() {
        let mut h = crate::stats::new_hist();
        for v in 1..10_000 {
            h.record(v).unwrap();
        }
        let s = latency_svg(&h, "t <1>", "sub");
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("99.9%"));
        assert!(s.contains("t &lt;1&gt;"));
        assert!(latency_svg(&crate::stats::new_hist(), "x", "y").contains("no samples"));
    }
}
