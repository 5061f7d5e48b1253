// `parallax`: the command-line front end. Every bad input ends here as one error line and exit
// code 2; everything else is in the libraries.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <cstdio>
#include <string>

#include "engine/cli/commands.hpp"
#include "engine/core/error.hpp"

int main(int argc, char** argv) {
  CLI::App app{"Parallax: plan, measure, simulate and compare large-model training"};
  app.require_subcommand(1);
  px::cli::Options opts;
  px::cli::register_commands(app, opts);
  try {
    app.parse(argc, argv);
    if (opts.train_cmd->parsed()) return px::cli::train(opts, &argc, &argv);
    return px::cli::run(app, opts);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    // CLI11 reports a stray word as a missing subcommand; name the word instead.
    const auto rest = app.remaining();
    const std::string what = rest.empty() ? e.what() : "unknown command or argument '" + rest.front() + "'";
    std::fprintf(stderr, "parallax: usage error: %s (hint: parallax --help)\n", what.c_str());
    return 2;
  } catch (const px::Error& e) {
    std::fprintf(stderr, "parallax: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {  // a device or library fault (CUDA, SQLite, I/O) past the input checks
    std::fprintf(stderr, "parallax: error: %s\n", e.what());
    return 1;
  }
}
