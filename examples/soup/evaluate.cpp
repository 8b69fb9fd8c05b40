// soup_evaluate: scores TorchScript models on a held-out split and draws an SVG bar chart.
// Links LibTorch only (not torchmerge): the soups torchmerge writes are ordinary TorchScript.
//
//   soup_evaluate --eval TEST_EVAL.pt [--svg CHART.svg] [--title TEXT]
//                 NAME=MODEL.pt ... [--soup NAME=MODEL.pt ...]
//       prints a table: model, accuracy on the split (%, 2 decimals), file size; NAME=MODEL.pt
//       arguments are ingredients, --soup ones are soups (drawn in other colours, and compared
//       with the best ingredient). Writes the chart when --svg is given.
//   soup_evaluate --eval VAL_EVAL.pt --scores MODEL.pt ...
//       prints the scores, comma-separated, full precision (e.g. weights for weighted_average).
//
// TEST_EVAL.pt is an evaluation module as torchmerge greedy_soup takes: a TorchScript module
// with a Tensor attribute `inputs` and forward(outputs) -> 0-dim score (here: the accuracy of
// outputs.argmax(1) against its labels). Each model runs model.forward(inputs) in eval mode,
// with no grad, on one CPU thread (so the numbers do not depend on the machine's core count).
#include <ATen/Parallel.h>
#include <torch/script.h>

#include "../common/torchscript_eval.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace {

struct Entry {
    std::string name, path;
    bool soup = false;
    double score = 0;
    uintmax_t bytes = 0;
};

using tm_example::die;
using tm_example::fmt;
using tm_example::load;
using tm_example::xml;

// A bar per model; the y axis starts at `floor` (a round number below the lowest bar), which
// the axis title says, so small differences are visible without pretending the bars start at 0.
void write_svg(const std::string &path, const std::vector<Entry> &entries, const std::string &title, size_t n_split) {
    const double W = 880, H = 440, left = 70, right = 110, top = 60, bottom = 120;
    const double plot_w = W - left - right, plot_h = H - top - bottom;
    double lo = 100, best_ingredient = -1;
    for (const auto &e : entries) {
        lo = std::min(lo, 100 * e.score);
        if (!e.soup) best_ingredient = std::max(best_ingredient, 100 * e.score);
    }
    double floor = std::max(0.0, 5 * std::floor((lo - 2) / 5));
    auto y = [&](double pct) { return top + plot_h * (1 - (pct - floor) / (100 - floor)); };
    std::ofstream f(path);
    if (!f) die(path + ": cannot write");
    tm_example::svg_begin(f, W, H, title);
    f << "<text x=\"" << W / 2 << "\" y=\"44\" text-anchor=\"middle\" fill=\"#555\">accuracy on " << n_split
      << " held-out test images; the y axis starts at " << floor << "%</text>\n";
    for (double t = floor; t <= 100.0001; t += (100 - floor) <= 20 ? 2.5 : 10) {
        f << "<line x1=\"" << left << "\" x2=\"" << W - right << "\" y1=\"" << y(t) << "\" y2=\"" << y(t)
          << "\" stroke=\"#ddd\"/>\n";
        f << "<text x=\"" << left - 6 << "\" y=\"" << y(t) + 4 << "\" text-anchor=\"end\">" << fmt("%.1f", t) << "</text>\n";
    }
    f << "<text transform=\"translate(18," << top + plot_h / 2 << ") rotate(-90)\" text-anchor=\"middle\">accuracy (%)</text>\n";
    const double slot = plot_w / double(entries.size()), bar = slot * 0.62;
    for (size_t i = 0; i < entries.size(); i++) {
        const Entry &e = entries[i];
        double pct = 100 * e.score, x = left + slot * double(i) + (slot - bar) / 2;
        const char *colour = !e.soup ? "#8da0cb" : e.name.find("greedy") != std::string::npos ? "#1b9e77" : "#fc8d62";
        f << "<rect x=\"" << x << "\" y=\"" << y(pct) << "\" width=\"" << bar << "\" height=\"" << y(floor) - y(pct)
          << "\" fill=\"" << colour << "\"><title>" << xml(e.name) << ": " << fmt("%.2f", pct) << "%</title></rect>\n";
        f << "<text x=\"" << x + bar / 2 << "\" y=\"" << y(pct) - 5 << "\" text-anchor=\"middle\">" << fmt("%.2f", pct)
          << "</text>\n";
        double lx = x + bar / 2, ly = top + plot_h + 14;
        f << "<text transform=\"translate(" << lx << "," << ly << ") rotate(-30)\" text-anchor=\"end\">" << xml(e.name)
          << "</text>\n";
    }
    if (best_ingredient >= floor) {
        f << "<line x1=\"" << left << "\" x2=\"" << W - right + 4 << "\" y1=\"" << y(best_ingredient) << "\" y2=\""
          << y(best_ingredient) << "\" stroke=\"#333\" stroke-dasharray=\"5,4\"/>\n";
        f << "<text x=\"" << W - right + 6 << "\" y=\"" << y(best_ingredient) + 4
          << "\" fill=\"#333\">best ingredient</text>\n";
    }
    f << "<line x1=\"" << left << "\" x2=\"" << left << "\" y1=\"" << top << "\" y2=\"" << top + plot_h
      << "\" stroke=\"#333\"/>\n";
    f << "<line x1=\"" << left << "\" x2=\"" << W - right << "\" y1=\"" << top + plot_h << "\" y2=\"" << top + plot_h
      << "\" stroke=\"#333\"/>\n";
    const char *legend[][2] = {{"#8da0cb", "ingredient (one fine-tune)"}, {"#fc8d62", "uniform / weighted soup"},
                               {"#1b9e77", "greedy soup"}};
    for (int i = 0; i < 3; i++) {
        double lx = left + 10 + 230 * i, ly = H - 22;
        f << "<rect x=\"" << lx << "\" y=\"" << ly - 10 << "\" width=\"12\" height=\"12\" fill=\"" << legend[i][0] << "\"/>\n";
        f << "<text x=\"" << lx + 18 << "\" y=\"" << ly << "\">" << legend[i][1] << "</text>\n";
    }
    f << "</svg>\n";
    if (!f.flush()) die(path + ": cannot write");
}

void usage() {
    std::fprintf(stderr,
                 "usage: soup_evaluate --eval EVAL.pt [--svg CHART.svg] [--title TEXT] NAME=MODEL.pt ... "
                 "[--soup NAME=MODEL.pt ...]\n"
                 "       soup_evaluate --eval EVAL.pt --scores MODEL.pt ...\n");
    std::exit(2);
}

Entry parse_entry(const std::string &arg, bool soup) {
    auto eq = arg.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == arg.size()) die("expected NAME=MODEL.pt, got '" + arg + "'");
    return Entry{arg.substr(0, eq), arg.substr(eq + 1), soup};
}

}  // namespace

int main(int argc, char **argv) {
    tm_example::program = "soup_evaluate";
    std::string eval_path, svg, title = "Model soups on scikit-learn digits (MLP 64-64-10)";
    bool scores_only = false;
    std::vector<Entry> entries;
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) usage();
            return argv[++i];
        };
        if (a == "--eval") eval_path = value();
        else if (a == "--svg") svg = value();
        else if (a == "--title") title = value();
        else if (a == "--soup") entries.push_back(parse_entry(value(), true));
        else if (a == "--scores") scores_only = true;
        else if (a == "-h" || a == "--help") usage();
        else if (a.rfind("--", 0) == 0) die("unknown option " + a);
        else if (scores_only) entries.push_back(Entry{a, a});
        else entries.push_back(parse_entry(a, false));
    }
    if (eval_path.empty() || entries.empty()) usage();
    at::set_num_threads(1);

    torch::jit::Module eval = load(eval_path);
    at::Tensor inputs = tm_example::eval_inputs(eval, eval_path);
    for (auto &e : entries) {
        torch::jit::Module model = load(e.path);
        e.score = tm_example::score(eval, inputs, model, e.path);
        std::error_code ec;
        e.bytes = std::filesystem::file_size(e.path, ec);
    }
    if (scores_only) {
        for (size_t i = 0; i < entries.size(); i++) std::printf("%s%.17g", i ? "," : "", entries[i].score);
        std::printf("\n");
        return 0;
    }

    size_t width = 5;
    for (const auto &e : entries) width = std::max(width, e.name.size());
    std::printf("%-*s  %14s  %10s\n", int(width), "model", "test accuracy", "file size");
    double best = -1;
    for (const auto &e : entries) {
        std::printf("%-*s  %13.2f%%  %7.1f KB\n", int(width), e.name.c_str(), 100 * e.score, double(e.bytes) / 1000);
        if (!e.soup) best = std::max(best, e.score);
    }
    std::printf("(%lld held-out test images; best ingredient %.2f%%)\n", (long long)inputs.size(0), 100 * best);
    if (!svg.empty()) {
        write_svg(svg, entries, title, size_t(inputs.size(0)));
        std::printf("chart: %s\n", svg.c_str());
    }
    return 0;
}
