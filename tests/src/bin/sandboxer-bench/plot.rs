// SPDX-License-Identifier: Apache-2.0
//! `--plot FILE.svg`: a figure of a start-latency scenario, beside its table and JSON. Left:
//! the distribution of each kind of start as a CDF (the fraction of starts done by a given
//! time; a curve further left is faster, a long tail shows as a late climb). Right: where the
//! time of a start goes, the median of each phase as a bar, with its p99 as a thin line.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use plotters::prelude::*;

/// One kind of start and its samples.
pub(crate) struct Series<'a> {
    pub(crate) name: &'a str,
    pub(crate) samples: &'a [Duration],
}

/// One phase of a start and its samples.
pub(crate) struct Phase<'a> {
    pub(crate) name: &'a str,
    pub(crate) samples: &'a [Duration],
}

const COLOURS: [RGBColor; 4] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
];

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The quantile `permille`/1000 of sorted samples (nearest rank).
fn quantile(sorted: &[f64], permille: usize) -> f64 {
    let last = sorted.len().saturating_sub(1);
    sorted
        .get((last * permille + 500) / 1000)
        .copied()
        .unwrap_or(0.0)
}

fn sorted_ms(samples: &[Duration]) -> Vec<f64> {
    let mut v: Vec<f64> = samples.iter().copied().map(ms).collect();
    v.sort_by(f64::total_cmp);
    v
}

/// Writes the figure to `path` (SVG).
pub(crate) fn write(
    path: &Path,
    title: &str,
    series: &[Series<'_>],
    phases_of: &str,
    phases: &[Phase<'_>],
) -> anyhow::Result<()> {
    draw(path, title, series, phases_of, phases)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("cannot draw {}", path.display()))?;
    // On stderr: the JSON stays the last line of stdout.
    eprintln!("plot: {}", path.display());
    Ok(())
}

fn draw(
    path: &Path,
    title: &str,
    series: &[Series<'_>],
    phases_of: &str,
    phases: &[Phase<'_>],
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1100, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let (left, right) = root.split_horizontally(560);

    // CDF of each kind of start, on one time axis up to the largest p99.5.
    let curves: Vec<(&str, Vec<f64>)> = series
        .iter()
        .filter(|s| !s.samples.is_empty())
        .map(|s| (s.name, sorted_ms(s.samples)))
        .collect();
    let x_max = curves
        .iter()
        .map(|(_, v)| quantile(v, 995))
        .fold(0.0f64, f64::max)
        .max(0.001)
        * 1.1;
    let mut cdf = ChartBuilder::on(&left)
        .caption("start latency (CDF)", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..x_max, 0f64..1f64)?;
    cdf.configure_mesh()
        .x_desc("ms")
        .y_desc("fraction of starts done")
        .draw()?;
    for (i, (name, v)) in curves.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let n = v.len() as f64;
        let points = v
            .iter()
            .enumerate()
            .map(|(k, x)| (x.min(x_max), (k + 1) as f64 / n));
        let label = format!(
            "{name}: p50 {:.2} ms, p99 {:.2} ms (n={})",
            quantile(v, 500),
            quantile(v, 990),
            v.len()
        );
        cdf.draw_series(LineSeries::new(points, colour.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour));
    }
    cdf.configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;

    // Median (bar) and p99 (line) of each phase.
    let bars: Vec<(&str, f64, f64)> = phases
        .iter()
        .map(|p| {
            let v = sorted_ms(p.samples);
            (p.name, quantile(&v, 500), quantile(&v, 990))
        })
        .collect();
    let p_max = bars.iter().map(|b| b.2).fold(0.0f64, f64::max).max(0.001) * 1.15;
    let rows = bars.len().max(1);
    let mut phase_chart = ChartBuilder::on(&right)
        .caption(
            format!("where a {phases_of} spends its time (bar p50, line p99)"),
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(110)
        .build_cartesian_2d(0f64..p_max, 0f64..rows as f64)?;
    let names: Vec<&str> = bars.iter().map(|b| b.0).collect();
    phase_chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(rows * 2 + 1)
        .y_label_formatter(&|y| {
            // Row i's name sits at its middle, i + 0.5 (the first phase at the top).
            (0..names.len())
                .find(|&i| (i as f64 + 0.5 - y).abs() < 0.01)
                .map_or_else(String::new, |i| names[names.len() - 1 - i].to_string())
        })
        .x_desc("ms")
        .draw()?;
    for (i, (_, p50, p99)) in bars.iter().enumerate() {
        let y = (rows - 1 - i) as f64;
        phase_chart.draw_series(std::iter::once(Rectangle::new(
            [(0.0, y + 0.2), (*p50, y + 0.8)],
            COLOURS[0].filled(),
        )))?;
        phase_chart.draw_series(std::iter::once(PathElement::new(
            vec![(*p50, y + 0.5), (*p99, y + 0.5)],
            BLACK.stroke_width(1),
        )))?;
        phase_chart.draw_series(std::iter::once(Text::new(
            format!("{p50:.3}"),
            (*p50 + p_max * 0.01, y + 0.35),
            ("sans-serif", 12),
        )))?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_figure_has_both_panels() {
        let dir = std::env::temp_dir().join(format!("sbx-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.svg");
        let fast: Vec<Duration> = (1..=50)
            .map(|i| Duration::from_micros(400 + i * 10))
            .collect();
        let slow: Vec<Duration> = (1..=50)
            .map(|i| Duration::from_millis(15 + i / 5))
            .collect();
        write(
            &path,
            "test",
            &[
                Series {
                    name: "clone",
                    samples: &fast,
                },
                Series {
                    name: "boot",
                    samples: &slow,
                },
            ],
            "clone",
            &[
                Phase {
                    name: "vm",
                    samples: &fast,
                },
                Phase {
                    name: "setup",
                    samples: &fast,
                },
            ],
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{svg:.100}");
        for want in [
            "start latency (CDF)",
            "clone: p50",
            "boot: p50",
            "setup",
            "polyline",
        ] {
            assert!(svg.contains(want), "no {want} in the figure");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
