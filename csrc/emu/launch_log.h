// The emulation's launch log: which kernels a host call launched, for tests that check a dispatch
// (two kernels may give the same bits on purpose, so the outputs cannot tell them apart). Header
// only: the emulated kernels' launcher (cuda_emu_launch.h) records, bindings.cpp of the _cuda_emu
// module reads (genfast._cuda_emu.emu_launches()). Keeps the last kMaxLaunchLog launches.
#pragma once

#include <cstddef>
#include <mutex>
#include <string>
#include <vector>

namespace genfast_emu {

struct LaunchRecord {
  std::string kernel;  // the launch macro's kernel argument as written (often a local's name)
  unsigned grid_x, grid_y, grid_z, block_x;
};

constexpr size_t kMaxLaunchLog = 256;

inline std::mutex& launch_log_mutex() {
  static std::mutex m;
  return m;
}
inline std::vector<LaunchRecord>& launch_log() {
  static std::vector<LaunchRecord> log;
  return log;
}
inline void log_launch(const char* kernel, unsigned gx, unsigned gy, unsigned gz, unsigned bx) {
  std::lock_guard<std::mutex> lock(launch_log_mutex());
  auto& log = launch_log();
  if (log.size() >= kMaxLaunchLog) log.erase(log.begin());
  log.push_back(LaunchRecord{kernel, gx, gy, gz, bx});
}
// The launches since the last call (oldest first), and the log emptied.
inline std::vector<LaunchRecord> take_launch_log() {
  std::lock_guard<std::mutex> lock(launch_log_mutex());
  std::vector<LaunchRecord> out;
  out.swap(launch_log());
  return out;
}

}  // namespace genfast_emu
