//! `loadgen report DIR`: the tables and charts of a `scripts/compare.sh` run.
//!
//! Reads `DIR/runs/*.json` (one per pattern and workload: the pattern, the workload, the
//! server's CPU seconds over the run, and loadgen's JSON) and writes `DIR/summary.md`
//! (prefixed by `DIR/setup.md` when compare.sh left one), `throughput.svg`,
//! `cpu-per-request.svg` and `latency-WORKLOAD.svg`.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::{Deserialize, Serialize};

use crate::stats::{Latency, Summary, group, human_us};

/// One measured run, as compare.sh writes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    pub pattern: String,
    pub workload: String,
    /// utime+stime of the server's process tree over the loadgen run, in seconds.
    pub server_cpu_s: Option<f64>,
    /// /proc/loadavg's three numbers when the run began: how busy the shared machine was.
    #[serde(default)]
    pub loadavg: Option<String>,
    pub loadgen: Summary,
}

impl Run {
    /// Server CPU per reply, over the whole loadgen run (warm-up included on both sides).
    pub fn server_us_per_request(&self) -> Option<f64> {
        let replies = self.loadgen.all_responses;
        self.server_cpu_s
            .filter(|_| replies > 0)
            .map(|s| s * 1e6 / replies as f64)
    }

    /// The latency the charts show: overall, or for a mix its heaviest-weighted class (the
    /// common request, and how the rare ones delay it).
    pub fn chart_latency(&self) -> (&Latency, Option<&str>) {
        let classes = &self.loadgen.classes;
        if classes.len() > 1 {
            let main = classes.iter().max_by_key(|c| c.weight).expect("classes");
            (&main.latency_us, Some(main.name.as_str()))
        } else {
            (&self.loadgen.latency_us, None)
        }
    }
}

/// The workloads compare.sh runs, in the order tables and charts show them.
const WORKLOAD_ORDER: [&str; 5] = ["hello", "pipelined", "churn", "mix", "idle"];

/// Tableau 10: distinct on screen and in print; nginx, the reference, is drawn in black.
const PALETTE: [(u8, u8, u8); 10] = [
    (78, 121, 167),
    (242, 142, 43),
    (225, 87, 89),
    (118, 183, 178),
    (89, 161, 79),
    (237, 201, 72),
    (176, 122, 161),
    (255, 157, 167),
    (156, 117, 95),
    (186, 176, 172),
];

pub fn load(dir: &Path) -> Result<Vec<Run>, String> {
    let runs_dir = dir.join("runs");
    let entries =
        std::fs::read_dir(&runs_dir).map_err(|e| format!("{}: {e}", runs_dir.display()))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    let mut runs = Vec::new();
    for p in paths {
        let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        let run: Run = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?;
        runs.push(run);
    }
    if runs.is_empty() {
        return Err(format!("no runs in {}", runs_dir.display()));
    }
    Ok(runs)
}

/// Writes the summary and the charts; returns the files written.
pub fn write(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let runs = load(dir)?;
    let table = Table::new(&runs);
    let mut written = Vec::new();

    let summary = dir.join("summary.md");
    let setup = std::fs::read_to_string(dir.join("setup.md")).unwrap_or_default();
    std::fs::write(&summary, format!("{setup}{}", table.markdown()))
        .map_err(|e| format!("{}: {e}", summary.display()))?;
    written.push(summary);

    let path = dir.join("throughput.svg");
    table
        .bars(&path, "Throughput (requests/s, higher is better)", |r| {
            Some(r.loadgen.requests_per_s)
        })
        .map_err(|e| format!("{}: {e}", path.display()))?;
    written.push(path);

    let path = dir.join("cpu-per-request.svg");
    table
        .bars(
            &path,
            "Server CPU per request (µs of user+system time, lower is better)",
            Run::server_us_per_request,
        )
        .map_err(|e| format!("{}: {e}", path.display()))?;
    written.push(path);

    for w in &table.workloads {
        let path = dir.join(format!("latency-{}.svg", file_safe(w)));
        table
            .latency(&path, w)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// The runs, indexed by pattern and workload.
struct Table<'a> {
    patterns: Vec<String>,
    workloads: Vec<String>,
    runs: &'a [Run],
}

impl<'a> Table<'a> {
    fn new(runs: &'a [Run]) -> Table<'a> {
        let mut patterns: Vec<String> = runs
            .iter()
            .map(|r| r.pattern.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        // The reference first.
        patterns.sort_by_key(|p| p != "nginx");
        let mut workloads: Vec<String> = runs
            .iter()
            .map(|r| r.workload.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        workloads.sort_by_key(|w| {
            WORKLOAD_ORDER
                .iter()
                .position(|k| k == w)
                .unwrap_or(WORKLOAD_ORDER.len())
        });
        Table {
            patterns,
            workloads,
            runs,
        }
    }

    fn get(&self, pattern: &str, workload: &str) -> Option<&'a Run> {
        self.runs
            .iter()
            .find(|r| r.pattern == pattern && r.workload == workload)
    }

    fn color(&self, pattern: &str) -> RGBColor {
        if pattern == "nginx" {
            return RGBColor(40, 40, 40);
        }
        let i = self
            .patterns
            .iter()
            .filter(|p| *p != "nginx")
            .position(|p| p == pattern)
            .unwrap_or(0);
        let (r, g, b) = PALETTE[i % PALETTE.len()];
        RGBColor(r, g, b)
    }

    fn markdown(&self) -> String {
        let mut s = String::new();
        let header = |s: &mut String, first: &str| {
            let _ = write!(s, "| {first} |");
            for w in &self.workloads {
                let _ = write!(s, " {w} |");
            }
            let _ = write!(s, "\n|---|");
            for _ in &self.workloads {
                s.push_str("---:|");
            }
            s.push('\n');
        };
        let errors_note = |r: &Run| match r.loadgen.error_total() {
            0 => String::new(),
            n => format!(" ({} errors)", group(n)),
        };

        s.push_str("## Requests per second\n\n");
        header(&mut s, "pattern");
        for p in &self.patterns {
            let _ = write!(s, "| {p} |");
            for w in &self.workloads {
                match self.get(p, w) {
                    Some(r) => {
                        let rps = group(r.loadgen.requests_per_s.round() as u64);
                        let _ = write!(s, " {rps}{} |", errors_note(r));
                    }
                    None => s.push_str(" – |"),
                }
            }
            s.push('\n');
        }

        s.push_str(
            "\n## Server CPU per request (µs)\n\nutime+stime of the server's whole process tree \
             over the run, divided by the replies loadgen received (warm-up included on both \
             sides).\n\n",
        );
        header(&mut s, "pattern");
        for p in &self.patterns {
            let _ = write!(s, "| {p} |");
            for w in &self.workloads {
                match self.get(p, w).and_then(Run::server_us_per_request) {
                    Some(us) => {
                        let _ = write!(s, " {us:.2} |");
                    }
                    None => s.push_str(" – |"),
                }
            }
            s.push('\n');
        }

        s.push_str(
            "\n## Every run\n\nLatency percentiles over the measured window; for the open-loop \
             runs they count from when each request fell due. `srv CPU` is the server's CPU \
             over the run as a share of one core; `gen CPU` likewise for loadgen; `load` is \
             the machine's 1-minute load average as the run began.\n\n\
             | pattern | workload | req/s | MiB/s | p50 | p90 | p99 | p99.9 | max | errors | \
             srv µs/req | srv CPU | gen CPU | load |\n\
             |---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|\n",
        );
        for w in &self.workloads {
            for p in &self.patterns {
                let Some(r) = self.get(p, w) else { continue };
                let g = &r.loadgen;
                let l = &g.latency_us;
                let errors: Vec<String> = g
                    .errors
                    .iter()
                    .filter(|(_, n)| **n > 0)
                    .map(|(k, n)| format!("{k} {}", group(*n)))
                    .collect();
                let non_2xx: u64 = g
                    .status
                    .iter()
                    .filter(|(code, _)| !code.starts_with('2'))
                    .map(|(_, n)| n)
                    .sum();
                let mut errs = if errors.is_empty() {
                    "0".to_string()
                } else {
                    errors.join(", ")
                };
                if non_2xx > 0 {
                    let _ = write!(errs, "; {} non-2xx", group(non_2xx));
                }
                // The whole run, warm-up included, for the CPU shares.
                let wall = g.duration_s + g.warmup_s;
                let srv_share = r
                    .server_cpu_s
                    .map(|c| format!("{:.0}%", 100.0 * c / wall))
                    .unwrap_or_else(|| "–".into());
                let srv_us = r
                    .server_us_per_request()
                    .map(|u| format!("{u:.2}"))
                    .unwrap_or_else(|| "–".into());
                let load = r
                    .loadavg
                    .as_deref()
                    .and_then(|l| l.split_whitespace().next())
                    .unwrap_or("–");
                let _ = writeln!(
                    s,
                    "| {p} | {w} | {} | {:.1} | {} | {} | {} | {} | {} | {errs} | {srv_us} | {srv_share} | {:.0}% | {load} |",
                    group(g.requests_per_s.round() as u64),
                    g.bytes_per_s / 1024.0 / 1024.0,
                    human_us(l.p50),
                    human_us(l.p90),
                    human_us(l.p99),
                    human_us(l.p99_9),
                    human_us(l.max),
                    100.0 * g.loadgen_cpu_s / g.duration_s.max(1e-9),
                );
            }
        }

        let mixes: Vec<&Run> = self
            .workloads
            .iter()
            .flat_map(|w| self.patterns.iter().filter_map(move |p| self.get(p, w)))
            .filter(|r| r.loadgen.classes.len() > 1)
            .collect();
        if !mixes.is_empty() {
            s.push_str(
                "\n## Per request class\n\n\
                 | pattern | workload | class | requests | p50 | p90 | p99 | p99.9 | max |\n\
                 |---|---|---|---:|---:|---:|---:|---:|---:|\n",
            );
            for r in mixes {
                for c in &r.loadgen.classes {
                    let l = &c.latency_us;
                    let _ = writeln!(
                        s,
                        "| {} | {} | `{}` | {} | {} | {} | {} | {} | {} |",
                        r.pattern,
                        r.workload,
                        c.name,
                        group(c.requests),
                        human_us(l.p50),
                        human_us(l.p90),
                        human_us(l.p99),
                        human_us(l.p99_9),
                        human_us(l.max)
                    );
                }
            }
        }

        s.push_str("\n## Charts\n\n![throughput](throughput.svg)\n\n![server CPU per request](cpu-per-request.svg)\n");
        for w in &self.workloads {
            let _ = write!(s, "\n![latency: {w}](latency-{}.svg)\n", file_safe(w));
        }
        s
    }

    /// One panel per workload, a horizontal bar per pattern.
    fn bars(
        &self,
        path: &Path,
        title: &str,
        value: impl Fn(&Run) -> Option<f64>,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let cols = self.workloads.len().clamp(1, 2);
        let rows = self.workloads.len().div_ceil(cols);
        let n = self.patterns.len();
        let panel_h = 70 + 26 * n as u32;
        let width = 560 * cols as u32;
        let root = SVGBackend::new(path, (width, 50 + panel_h * rows as u32)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(title, ("sans-serif", 22))?;
        let panels = root.split_evenly((rows, cols));
        for (panel, w) in panels.iter().zip(&self.workloads) {
            let values: Vec<Option<f64>> = self
                .patterns
                .iter()
                .map(|p| self.get(p, w).and_then(&value))
                .collect();
            let max = values.iter().flatten().fold(0.0f64, |a, &b| a.max(b));
            let x_max = if max > 0.0 { max * 1.25 } else { 1.0 };
            let mut chart = ChartBuilder::on(panel)
                .caption(w, ("sans-serif", 17))
                .margin(8)
                .margin_right(24)
                .x_label_area_size(28)
                .y_label_area_size(150)
                .build_cartesian_2d(0.0..x_max, (0..n).into_segmented())?;
            let names = &self.patterns;
            chart
                .configure_mesh()
                .disable_y_mesh()
                .light_line_style(TRANSPARENT)
                .y_labels(n)
                .x_labels(5)
                .y_label_formatter(&|v| match v {
                    SegmentValue::CenterOf(i) if *i < n => names[n - 1 - *i].clone(),
                    _ => String::new(),
                })
                .x_label_formatter(&|x| short(*x))
                .label_style(("sans-serif", 13))
                .draw()?;
            // The first pattern at the top. (An integer range includes its end, so the top
            // segment, n, stays empty.)
            let row = |i: usize| n - 1 - i;
            chart.draw_series(values.iter().enumerate().filter_map(|(i, v)| {
                let v = (*v)?;
                let color = self.color(&self.patterns[i]);
                let mut bar = Rectangle::new(
                    [
                        (0.0, SegmentValue::Exact(row(i))),
                        (v, SegmentValue::Exact(row(i) + 1)),
                    ],
                    color.filled(),
                );
                bar.set_margin(4, 4, 0, 0);
                Some(bar)
            }))?;
            chart.draw_series(values.iter().enumerate().map(|(i, v)| {
                let label = match v {
                    Some(v) => short(*v),
                    None => "n/a".to_string(),
                };
                let x = v.unwrap_or(0.0) + x_max * 0.01;
                Text::new(
                    label,
                    (x, SegmentValue::CenterOf(row(i))),
                    TextStyle::from(("sans-serif", 12).into_font())
                        .pos(Pos::new(HPos::Left, VPos::Center)),
                )
            }))?;
        }
        root.present()?;
        Ok(())
    }

    /// Latency against percentile, one line per pattern, for one workload.
    fn latency(&self, path: &Path, workload: &str) -> Result<(), Box<dyn std::error::Error>> {
        let mut lines = Vec::new();
        let mut class_name = None;
        for p in &self.patterns {
            let Some(r) = self.get(p, workload) else {
                continue;
            };
            let (lat, class) = r.chart_latency();
            class_name = class_name.or(class);
            let n = lat_count(r, class) as f64;
            // x = 1 / (1 - p): each decade is one more nine. The maximum of N samples sits
            // at rank N.
            let points: Vec<(f64, f64)> = lat
                .curve
                .iter()
                .map(|&[pct, us]| {
                    let x = if pct >= 100.0 {
                        n.max(1.0)
                    } else {
                        (100.0 / (100.0 - pct)).min(n.max(1.0))
                    };
                    (x, (us / 1000.0).max(0.001))
                })
                .collect();
            if !points.is_empty() {
                lines.push((p.clone(), points));
            }
        }
        let all = lines.iter().flat_map(|(_, pts)| pts.iter());
        let (x_max, y_min, y_max) = all
            .fold((10.0f64, f64::MAX, 0.0f64), |(x, lo, hi), &(px, py)| {
                (x.max(px), lo.min(py), hi.max(py))
            });
        let x_max = 10f64.powf(x_max.log10().ceil());
        let (y_min, y_max) = if y_max > 0.0 {
            (y_min / 1.5, y_max * 1.5)
        } else {
            (0.001, 1.0)
        };

        let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
        root.fill(&WHITE)?;
        let title = match class_name {
            Some(c) => format!("Latency by percentile: {workload} (requests {c})"),
            None => format!("Latency by percentile: {workload}"),
        };
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .margin_right(24)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((1.0..x_max).log_scale(), (y_min..y_max).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("latency (ms)")
            .x_label_formatter(&|x| percentile_label(*x))
            .y_label_formatter(&|y| short_ms(*y))
            .label_style(("sans-serif", 13))
            .draw()?;
        for (p, points) in &lines {
            let color = self.color(p);
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.stroke_width(2),
                ))?
                .label(p.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .label_font(("sans-serif", 13))
            .draw()?;
        root.present()?;
        Ok(())
    }
}

/// Replies behind a latency curve: the run's, or its class's.
fn lat_count(r: &Run, class: Option<&str>) -> u64 {
    match class {
        Some(name) => r
            .loadgen
            .classes
            .iter()
            .find(|c| c.name == name)
            .map_or(0, |c| c.requests),
        None => r.loadgen.requests,
    }
}

/// 1 -> "0%", 10 -> "90%", 1000 -> "99.9%".
fn percentile_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 1.0 / x);
    let nines = x.log10().round() as usize;
    if (x - 10f64.powi(nines as i32)).abs() > x * 1e-6 {
        return String::new();
    }
    if nines <= 2 {
        format!("{p:.0}%")
    } else {
        format!("{:.*}%", nines - 2, p)
    }
}

fn short(x: f64) -> String {
    let a = x.abs();
    if a >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", x / 1e3)
    } else if a >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else if a >= 10.0 || a == 0.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

fn short_ms(ms: f64) -> String {
    if ms >= 1.0 {
        format!("{ms:.0}")
    } else {
        let s = format!("{ms:.3}");
        s.trim_end_matches('0').to_string()
    }
}

fn file_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(percentile_label(1.0), "0%");
        assert_eq!(percentile_label(10.0), "90%");
        assert_eq!(percentile_label(100.0), "99%");
        assert_eq!(percentile_label(1000.0), "99.9%");
        assert_eq!(percentile_label(100000.0), "99.999%");
        assert_eq!(percentile_label(20.0), "");
        assert_eq!(short(185_234.0), "185k");
        assert_eq!(short(5_100.0), "5.1k");
        assert_eq!(short(5.123), "5.12");
        assert_eq!(short(2_500_000.0), "2.50M");
        assert_eq!(short_ms(0.25), "0.25");
        assert_eq!(file_safe("mix/1%"), "mix_1_");
    }
}
