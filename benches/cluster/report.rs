//! The results: one row per measured figure, each with the baseline it ran beside; printed
//! as a table, written as `bench-results.json`, and the throughput-vs-clients chart as SVG.

use std::path::Path;

use serde_json::json;

pub struct Row {
    pub name: String,
    pub unit: &'static str,
    pub flotilla: f64,
    pub baseline_name: String,
    pub baseline: f64,
    pub higher_is_better: bool,
}

impl Row {
    pub fn new(
        name: impl Into<String>,
        unit: &'static str,
        flotilla: f64,
        baseline_name: impl Into<String>,
        baseline: f64,
        higher_is_better: bool,
    ) -> Row {
        Row {
            name: name.into(),
            unit,
            flotilla,
            baseline_name: baseline_name.into(),
            baseline,
            higher_is_better,
        }
    }

    /// flotilla / baseline (so > 1 is better where higher is better, worse otherwise).
    pub fn ratio(&self) -> f64 {
        if self.baseline == 0.0 {
            f64::NAN
        } else {
            self.flotilla / self.baseline
        }
    }
}

fn num(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

pub fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:<40} {:>12} {:>12} {:<34} {:>12} {:>7}",
        "benchmark", "unit", "flotilla", "baseline", "", "ratio"
    );
    for r in rows {
        let arrow = if r.higher_is_better { "↑" } else { "↓" };
        println!(
            "{:<40} {:>12} {:>12} {:<34} {:>12} {:>7} {arrow}",
            r.name,
            r.unit,
            num(r.flotilla),
            r.baseline_name,
            num(r.baseline),
            num(r.ratio())
        );
    }
}

/// Today's date (UTC) from the system clock, as YYYY-MM-DD (civil-from-days).
pub fn today() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

pub fn write_json(path: &Path, rows: &[Row], mode: &str) -> std::io::Result<()> {
    let results: Vec<_> = rows
        .iter()
        .map(|r| {
            json!({
                "name": r.name, "unit": r.unit,
                "flotilla": finite(r.flotilla),
                "baseline_name": r.baseline_name, "baseline": finite(r.baseline),
                "ratio": finite(r.ratio()),
                "higher_is_better": r.higher_is_better,
            })
        })
        .collect();
    let doc = json!({
        "date": today(),
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu": cpu_model(),
        "mode": mode,
        "results": results,
    });
    std::fs::write(path, serde_json::to_string_pretty(&doc).expect("JSON of plain values") + "\n")
}

/// JSON has no NaN: a figure that could not be computed is null.
fn finite(v: f64) -> serde_json::Value {
    if v.is_finite() {
        json!(v)
    } else {
        serde_json::Value::Null
    }
}

pub fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find_map(|l| {
            l.strip_prefix("model name").and_then(|v| v.split_once(':')).map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// (clients, flotilla writes/s, etcd writes/s).
type Point = (usize, f64, f64);
/// A line of the chart: its label, its colour, and how to read its y from a point.
type Series = (&'static str, plotters::style::RGBColor, fn(&Point) -> f64);

/// Writes a line chart of write throughput against client count, one line per system.
pub fn write_chart(path: &Path, points: &[Point]) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_y = points.iter().map(|p| p.1.max(p.2)).fold(0.0, f64::max) * 1.15;
    let max_x = points.iter().map(|p| p.0).max().unwrap_or(1) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption("Durable 128-byte writes/s, three nodes, against concurrent clients", ("sans-serif", 18))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((1f64..max_x * 1.3).log_scale(), 0f64..max_y.max(1.0))?;
    chart
        .configure_mesh()
        .x_desc("concurrent clients")
        .y_desc("writes/s")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    let series: [Series; 2] = [
        ("flotilla", RGBColor(0x1f, 0x77, 0xb4), |p| p.1),
        ("etcd 3.4", RGBColor(0xd6, 0x27, 0x28), |p| p.2),
    ];
    for (label, color, y) in series {
        let data: Vec<(f64, f64)> = points.iter().map(|p| (p.0 as f64, y(p))).collect();
        chart
            .draw_series(LineSeries::new(data.clone(), color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(data.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
    }
    upper_left_legend(&mut chart)?;
    root.present()?;
    Ok(())
}

/// (executors, leader CPU % of a core, p99 task fetch ms).
type ExecutorsPoint = (usize, f64, f64);

/// Writes the executors chart: the leader's CPU for heartbeats (left axis) and the p99
/// task fetch latency (right axis) against the number of executors.
pub fn write_executors_chart(
    path: &Path,
    points: &[ExecutorsPoint],
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let finite = |v: f64| if v.is_finite() { v } else { 0.0 };
    let max_cpu = points.iter().map(|p| finite(p.1)).fold(0.0, f64::max) * 1.2;
    let max_p99 = points.iter().map(|p| finite(p.2)).fold(0.0, f64::max) * 1.2;
    let min_x = points.iter().map(|p| p.0).min().unwrap_or(1) as f64;
    let max_x = points.iter().map(|p| p.0).max().unwrap_or(1) as f64;
    let x_range = || (min_x * 0.8..max_x * 1.25).log_scale();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Three nodes against simulated executors (heartbeat every 5 s, long poll)",
            ("sans-serif", 18),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .right_y_label_area_size(70)
        .build_cartesian_2d(x_range(), 0f64..max_cpu.max(1.0))?
        .set_secondary_coord(x_range(), 0f64..max_p99.max(1.0));
    chart
        .configure_mesh()
        .x_desc("executors")
        .y_desc("leader CPU, % of a core (heartbeats alone)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    chart
        .configure_secondary_axes()
        .y_desc("task fetch p99, ms")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    let cpu = RGBColor(0x1f, 0x77, 0xb4);
    let p99 = RGBColor(0xd6, 0x27, 0x28);
    let cpu_data: Vec<(f64, f64)> = points.iter().map(|p| (p.0 as f64, finite(p.1))).collect();
    let p99_data: Vec<(f64, f64)> = points.iter().map(|p| (p.0 as f64, finite(p.2))).collect();
    chart
        .draw_series(LineSeries::new(cpu_data.clone(), cpu.stroke_width(2)))?
        .label("leader CPU % (left)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], cpu.stroke_width(2)));
    chart.draw_series(cpu_data.into_iter().map(|p| Circle::new(p, 4, cpu.filled())))?;
    chart
        .draw_secondary_series(LineSeries::new(p99_data.clone(), p99.stroke_width(2)))?
        .label("task fetch p99 ms (right)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], p99.stroke_width(2)));
    chart.draw_secondary_series(p99_data.into_iter().map(|p| Circle::new(p, 4, p99.filled())))?;
    upper_left_legend(&mut chart)?;
    root.present()?;
    Ok(())
}

/// The series' legend, boxed, in the chart's upper left corner.
fn upper_left_legend<'a, DB: plotters::prelude::DrawingBackend + 'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut plotters::prelude::ChartContext<'a, DB, CT>,
) -> Result<(), plotters::drawing::DrawingAreaErrorKind<DB::ErrorType>> {
    use plotters::prelude::*;
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
}
