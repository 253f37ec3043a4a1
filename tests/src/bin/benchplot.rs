//! Draws the benchmark's plots from the series `tests/bench/summarize.py` writes
//! (`target/bench/plots.json`): RSS against connections, and latency against offered load.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Parser;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};
use serde::Deserialize;

#[derive(Parser)]
#[command(about = "Draw make bench's PNG plots")]
struct Args {
    /// Series written by summarize.py.
    #[arg(long, default_value = "target/bench/plots.json")]
    data: PathBuf,
    /// Directory to write rss.png and latency.png into.
    #[arg(long, default_value = "tests/bench")]
    out: PathBuf,
    /// A TrueType font for the labels.
    #[arg(
        long,
        default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    )]
    font: PathBuf,
}

#[derive(Deserialize)]
struct Plots {
    /// (connections, whole-process RSS KiB / connection, marginal RSS KiB / connection,
    /// marginal PSS KiB / connection when measured).
    rss: Vec<(f64, f64, f64, Option<f64>)>,
    /// (delivered events/s, p50 ms, p99 ms, p999 ms), one point per load level.
    latency: Vec<(f64, f64, f64, f64)>,
    /// The per-connection RSS target, KiB.
    rss_target_kib: f64,
}

const SIZE: (u32, u32) = (900, 560);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let font = std::fs::read(&args.font)
        .with_context(|| format!("cannot read the font {}", args.font.display()))?;
    register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| anyhow::anyhow!("{} is not a usable TrueType font", args.font.display()))?;
    let plots: Plots = serde_json::from_slice(
        &std::fs::read(&args.data)
            .with_context(|| format!("cannot read {}", args.data.display()))?,
    )?;
    std::fs::create_dir_all(&args.out)?;
    let rss = args.out.join("rss.png");
    draw(&rss, |root| rss_chart(root, &plots))?;
    let latency = args.out.join("latency.png");
    draw(&latency, |root| latency_chart(root, &plots))?;
    println!("wrote {} and {}", rss.display(), latency.display());
    Ok(())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// Renders into memory, then encodes the PNG.
fn draw(path: &Path, chart: impl FnOnce(&Area) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let mut pixels = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        chart(&root)?;
        root.present()?;
    }
    let file = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?,
    );
    let mut encoder = png::Encoder::new(file, SIZE.0, SIZE.1);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.write_header()?.write_image_data(&pixels)?;
    Ok(())
}

fn rss_chart(root: &Area, plots: &Plots) -> anyhow::Result<()> {
    let max_x = plots.rss.iter().map(|p| p.0).fold(1.0, f64::max) * 1.05;
    let max_y = plots
        .rss
        .iter()
        .map(|p| p.1.max(p.2))
        .fold(plots.rss_target_kib, f64::max)
        * 1.25;
    let mut chart = ChartBuilder::on(root)
        .caption(
            "Process RSS per connection (one live Wasm instance each)",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..max_x, 0f64..max_y)?;
    chart
        .configure_mesh()
        .x_desc("live connections")
        .y_desc("KiB per connection")
        .x_label_formatter(&|x| format!("{:.0}k", x / 1000.0))
        .draw()?;
    let whole: Vec<(f64, f64)> = plots.rss.iter().map(|p| (p.0, p.1)).collect();
    let marginal: Vec<(f64, f64)> = plots.rss.iter().map(|p| (p.0, p.2)).collect();
    chart
        .draw_series(LineSeries::new(whole.clone(), BLUE.stroke_width(2)))?
        .label("whole process RSS / connections")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart.draw_series(whole.iter().map(|&p| Circle::new(p, 4, BLUE.filled())))?;
    chart
        .draw_series(LineSeries::new(marginal.clone(), GREEN.stroke_width(2)))?
        .label("marginal: (RSS after - before) / connections")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN.stroke_width(2)));
    chart.draw_series(marginal.iter().map(|&p| Circle::new(p, 4, GREEN.filled())))?;
    let pss: Vec<(f64, f64)> = plots
        .rss
        .iter()
        .filter_map(|p| p.3.map(|pss| (p.0, pss)))
        .collect();
    if !pss.is_empty() {
        chart
            .draw_series(LineSeries::new(pss.clone(), MAGENTA.stroke_width(2)))?
            .label("marginal PSS (shared pages counted once)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], MAGENTA.stroke_width(2)));
        chart.draw_series(pss.iter().map(|&p| Circle::new(p, 4, MAGENTA.filled())))?;
    }
    chart
        .draw_series(LineSeries::new(
            vec![(0.0, plots.rss_target_kib), (max_x, plots.rss_target_kib)],
            RED.stroke_width(1),
        ))?
        .label("target")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    Ok(())
}

fn latency_chart(root: &Area, plots: &Plots) -> anyhow::Result<()> {
    let max_x = plots.latency.iter().map(|p| p.0).fold(1.0, f64::max) * 1.1;
    let max_y = plots.latency.iter().map(|p| p.3).fold(1.0, f64::max) * 2.0;
    let min_y = plots
        .latency
        .iter()
        .map(|p| p.1)
        .fold(max_y, f64::min)
        .max(0.01)
        / 2.0;
    let mut chart = ChartBuilder::on(root)
        .caption(
            "Publish-to-receive latency against load (10,000 connections)",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..max_x, (min_y..max_y).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("events delivered per second")
        .y_desc("latency, ms (log scale)")
        .x_label_formatter(&|x| format!("{:.0}k", x / 1000.0))
        .draw()?;
    for (name, color, pick) in [("p50", GREEN, 1usize), ("p99", BLUE, 2), ("p999", RED, 3)] {
        let points: Vec<(f64, f64)> = plots
            .latency
            .iter()
            .map(|p| (p.0, [p.1, p.2, p.3][pick - 1]))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    Ok(())
}
