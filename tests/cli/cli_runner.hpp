// Runs the `parallax` command (PX_CLI) as a user would, with the test datasets, capturing its exit
// code, stdout and stderr: the CLI tests' one way in.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>

#include <gtest/gtest.h>

namespace px::testing {

struct CliResult {
  int code = -1;
  std::string out, err;
};

// `args` are shell-quoted by the caller.
inline CliResult run_cli(const std::string& args) {
  static int calls = 0;
  const std::string err_file =
      ::testing::TempDir() + "/parallax_cli_stderr_" + std::to_string(getpid()) + "_" + std::to_string(++calls) + ".txt";
  const std::string cmd = std::string("'") + PX_CLI + "' --datasets '" + PX_DATASETS_DIR + "' " + args + " 2>'" + err_file + "'";
  CliResult r;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return r;
  std::array<char, 4096> buf{};
  std::size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  const int status = pclose(p);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream in(err_file);
  r.err.assign(std::istreambuf_iterator<char>(in), {});
  return r;
}

}  // namespace px::testing
