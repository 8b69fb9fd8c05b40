// multitask_evaluate: scores merged backbones on every task of examples/multitask and prints
// the method x task accuracy table; optionally writes it as Markdown and draws an SVG chart.
// Links LibTorch only (not torchmerge): the merged backbones torchmerge writes into the
// template are ordinary TorchScript modules.
//
//   multitask_evaluate --task NAME=EVAL.pt ... [--tsv] [--markdown FILE] [--svg FILE]
//                      [--title TEXT] [--info-header H1|H2...] ROW... [--info ROW=C1|C2...]
//   ROW:  [--ref] NAME=MODEL.pt              one backbone for every task (a merge)
//         [--ref] NAME=MODEL1.pt,MODEL2.pt,… one backbone per task, in --task order (the
//                                             individual fine-tunes: each on its own task)
//   --ref marks a reference row (pre-trained, individual), drawn in other colours.
//   --tsv prints, per row, NAME, the average and each task's accuracy, tab-separated, full
//   precision (run.sh picks hyper-parameters from it); otherwise a table with 2 decimals.
//
// Each EVAL.pt is a task's evaluation module (examples/multitask/make_eval.py): a Tensor
// attribute `inputs` (the task's images) and forward(features) -> 0-dim accuracy, which
// applies the task's own head (heads are not merged) and compares with the stored labels —
// the interface of torchmerge greedy_soup --eval. Each backbone is loaded once, run in eval
// mode with no grad on one CPU thread (the numbers do not depend on the machine's cores).
#include <ATen/Parallel.h>
#include <torch/script.h>

#include "../common/torchscript_eval.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <string>
#include <vector>

namespace {

using tm_example::die;
using tm_example::fmt;
using tm_example::xml;

struct Task {
    std::string name, path;
    torch::jit::Module eval;
    at::Tensor inputs;
};

struct Row {
    std::string name;
    std::vector<std::string> models;  // one, or one per task
    bool ref = false;
    std::vector<std::string> info;
    std::vector<double> acc;
    double avg = 0;
};

std::vector<std::string> split(const std::string &s, char sep) {
    std::vector<std::string> r;
    size_t start = 0;
    for (;;) {
        size_t p = s.find(sep, start);
        r.push_back(s.substr(start, p == std::string::npos ? std::string::npos : p - start));
        if (p == std::string::npos) return r;
        start = p + 1;
    }
}

std::pair<std::string, std::string> name_value(const std::string &arg, const char *what) {
    auto eq = arg.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == arg.size())
        die(std::string("expected ") + what + ", got '" + arg + "'");
    return {arg.substr(0, eq), arg.substr(eq + 1)};
}

void evaluate(std::vector<Row> &rows, std::vector<Task> &tasks) {
    std::map<std::string, torch::jit::Module> cache;
    for (auto &row : rows) {
        if (row.models.size() != 1 && row.models.size() != tasks.size())
            die(row.name + ": " + std::to_string(row.models.size()) + " models for " + std::to_string(tasks.size()) +
                " tasks (give one, or one per task)");
        double sum = 0;
        for (size_t t = 0; t < tasks.size(); t++) {
            const std::string &path = row.models.size() == 1 ? row.models[0] : row.models[t];
            auto it = cache.find(path);
            if (it == cache.end()) it = cache.emplace(path, tm_example::load(path)).first;
            double a = tm_example::score(tasks[t].eval, tasks[t].inputs, it->second, path);
            row.acc.push_back(a);
            sum += a;
        }
        row.avg = sum / double(tasks.size());
    }
}

void print_table(const std::vector<Row> &rows, const std::vector<Task> &tasks, const std::vector<std::string> &info_header) {
    int width = 6;
    for (const auto &r : rows) width = std::max(width, int(r.name.size()));
    std::printf("%-*s", width, "model");
    for (const auto &t : tasks) std::printf("  %*s", int(std::max<size_t>(6, t.name.size())), t.name.c_str());
    std::printf("  %7s", "average");
    for (const auto &h : info_header) std::printf("  %s", h.c_str());
    std::printf("\n");
    for (const auto &r : rows) {
        std::printf("%-*s", width, r.name.c_str());
        for (size_t t = 0; t < tasks.size(); t++)
            std::printf("  %*.2f", int(std::max<size_t>(6, tasks[t].name.size())), 100 * r.acc[t]);
        std::printf("  %7.2f", 100 * r.avg);
        for (const auto &c : r.info) std::printf("  %s", c.c_str());
        std::printf("\n");
    }
    std::printf("(accuracy %%, on each task's test split:");
    for (const auto &t : tasks) std::printf(" %s %lld", t.name.c_str(), (long long)t.inputs.size(0));
    std::printf(" images)\n");
}

void write_markdown(const std::string &path, const std::vector<Row> &rows, const std::vector<Task> &tasks,
                    const std::vector<std::string> &info_header) {
    std::ofstream f(path);
    if (!f) die(path + ": cannot write");
    f << "| model |";
    for (const auto &t : tasks) f << " " << t.name << " |";
    f << " **average** |";
    for (const auto &h : info_header) f << " " << h << " |";
    f << "\n|---|";
    for (size_t i = 0; i < tasks.size() + 1 + info_header.size(); i++) f << (i < tasks.size() + 1 ? "---:|" : "---|");
    f << "\n";
    for (const auto &r : rows) {
        f << "| " << r.name << " |";
        for (double a : r.acc) f << " " << fmt("%.2f", 100 * a) << " |";
        f << " **" << fmt("%.2f", 100 * r.avg) << "** |";
        for (size_t i = 0; i < info_header.size(); i++) f << " " << (i < r.info.size() ? r.info[i] : "") << " |";
        f << "\n";
    }
    if (!f.flush()) die(path + ": cannot write");
}

// Horizontal bars: each row's average accuracy, with a dot per task. The x axis starts at a
// round number below the lowest dot, which the subtitle says.
void write_svg(const std::string &path, const std::vector<Row> &rows, const std::vector<Task> &tasks,
               const std::string &title) {
    const double W = 900, left = 200, right = 70, top = 70, row_h = 26, bottom = 70;
    const double H = top + row_h * double(rows.size()) + bottom, plot_w = W - left - right;
    double lo = 100;
    for (const auto &r : rows)
        for (double a : r.acc) lo = std::min(lo, 100 * a);
    double floor = std::max(0.0, 10 * std::floor((lo - 1) / 10));
    auto x = [&](double pct) { return left + plot_w * (pct - floor) / (100 - floor); };
    const char *palette[] = {"#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"};
    std::ofstream f(path);
    if (!f) die(path + ": cannot write");
    tm_example::svg_begin(f, W, H, title);
    f << "<text x=\"" << W / 2 << "\" y=\"44\" text-anchor=\"middle\" fill=\"#555\">bar: average test accuracy over "
      << tasks.size() << " tasks; dots: each task; the x axis starts at " << floor << "%</text>\n";
    const double plot_bottom = top + row_h * double(rows.size());
    for (double t = floor; t <= 100.0001; t += 10) {
        f << "<line x1=\"" << x(t) << "\" x2=\"" << x(t) << "\" y1=\"" << top - 6 << "\" y2=\"" << plot_bottom
          << "\" stroke=\"#ddd\"/>\n";
        f << "<text x=\"" << x(t) << "\" y=\"" << plot_bottom + 16 << "\" text-anchor=\"middle\">" << fmt("%.0f", t)
          << "</text>\n";
    }
    f << "<text x=\"" << left + plot_w / 2 << "\" y=\"" << plot_bottom + 34 << "\" text-anchor=\"middle\">accuracy (%)</text>\n";
    for (size_t i = 0; i < rows.size(); i++) {
        const Row &r = rows[i];
        double y0 = top + row_h * double(i), pct = 100 * r.avg;
        f << "<text x=\"" << left - 8 << "\" y=\"" << y0 + row_h / 2 + 4 << "\" text-anchor=\"end\">" << xml(r.name)
          << "</text>\n";
        f << "<rect x=\"" << left << "\" y=\"" << y0 + 4 << "\" width=\"" << x(pct) - left << "\" height=\"" << row_h - 8
          << "\" fill=\"" << (r.ref ? "#b3b3b3" : "#8da0cb") << "\"><title>" << xml(r.name) << ": " << fmt("%.2f", pct)
          << "%</title></rect>\n";
        f << "<text x=\"" << x(pct) + 6 << "\" y=\"" << y0 + row_h / 2 + 4 << "\" font-weight=\"bold\">" << fmt("%.2f", pct)
          << "</text>\n";
        for (size_t t = 0; t < tasks.size(); t++)
            f << "<circle cx=\"" << x(100 * r.acc[t]) << "\" cy=\"" << y0 + row_h / 2 << "\" r=\"3\" fill=\""
              << palette[t % 8] << "\"><title>" << xml(r.name + ", " + tasks[t].name) << ": "
              << fmt("%.2f", 100 * r.acc[t]) << "%</title></circle>\n";
    }
    f << "<line x1=\"" << left << "\" x2=\"" << left << "\" y1=\"" << top - 6 << "\" y2=\"" << plot_bottom
      << "\" stroke=\"#333\"/>\n";
    double lx = 20, ly = H - 14;
    for (size_t t = 0; t < tasks.size(); t++) {
        f << "<circle cx=\"" << lx << "\" cy=\"" << ly - 4 << "\" r=\"4\" fill=\"" << palette[t % 8] << "\"/>\n";
        f << "<text x=\"" << lx + 8 << "\" y=\"" << ly << "\">" << xml(tasks[t].name) << "</text>\n";
        lx += 16 + 7.2 * double(tasks[t].name.size());
    }
    f << "</svg>\n";
    if (!f.flush()) die(path + ": cannot write");
}

void usage() {
    std::fprintf(stderr,
                 "usage: multitask_evaluate --task NAME=EVAL.pt ... [--tsv] [--markdown FILE] [--svg FILE] [--title TEXT]\n"
                 "                          [--info-header H1|H2...] [--ref] NAME=MODEL.pt[,MODEL.pt...] ... "
                 "[--info NAME=C1|C2...]\n");
    std::exit(2);
}

}  // namespace

int main(int argc, char **argv) {
    tm_example::program = "multitask_evaluate";
    std::string markdown, svg, title = "Multi-task merging: 8 tasks from Fashion-MNIST and digits";
    bool tsv = false, next_ref = false;
    std::vector<Task> tasks;
    std::vector<Row> rows;
    std::vector<std::string> info_header;
    std::vector<std::pair<std::string, std::string>> infos;
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) usage();
            return argv[++i];
        };
        if (a == "--task") {
            auto [name, path] = name_value(value(), "NAME=EVAL.pt");
            tasks.push_back(Task{name, path, {}, {}});
        } else if (a == "--tsv") tsv = true;
        else if (a == "--markdown") markdown = value();
        else if (a == "--svg") svg = value();
        else if (a == "--title") title = value();
        else if (a == "--info-header") info_header = split(value(), '|');
        else if (a == "--info") infos.push_back(name_value(value(), "NAME=TEXT"));
        else if (a == "--ref") next_ref = true;
        else if (a == "-h" || a == "--help") usage();
        else if (a.rfind("--", 0) == 0) die("unknown option " + a);
        else {
            auto [name, models] = name_value(a, "NAME=MODEL.pt");
            rows.push_back(Row{name, split(models, ','), next_ref, {}, {}, 0});
            next_ref = false;
        }
    }
    if (tasks.empty() || rows.empty()) usage();
    for (const auto &[name, text] : infos) {
        auto it = std::find_if(rows.begin(), rows.end(), [&](const Row &r) { return r.name == name; });
        if (it == rows.end()) die("--info " + name + ": no such row");
        it->info = split(text, '|');
    }
    at::set_num_threads(1);
    for (auto &t : tasks) {
        t.eval = tm_example::load(t.path);
        t.inputs = tm_example::eval_inputs(t.eval, t.path);
    }
    evaluate(rows, tasks);
    if (tsv) {
        for (const auto &r : rows) {
            std::printf("%s\t%.17g", r.name.c_str(), r.avg);
            for (double a : r.acc) std::printf("\t%.17g", a);
            std::printf("\n");
        }
        return 0;
    }
    print_table(rows, tasks, info_header);
    if (!markdown.empty()) write_markdown(markdown, rows, tasks, info_header);
    if (!svg.empty()) {
        write_svg(svg, rows, tasks, title);
        std::printf("chart: %s\n", svg.c_str());
    }
    return 0;
}
