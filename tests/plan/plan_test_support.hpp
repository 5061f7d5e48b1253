// Shared helpers of the plan tests: dataset models by name and plans built field by field.
#pragma once

#include <functional>
#include <string>

#include "engine/plan/compiler.hpp"
#include "engine/spec/spec_yaml.hpp"
#include "engine/spec/validate.hpp"

namespace px::test {

inline const SpecCatalog& catalog() {
  static const SpecCatalog c{PX_DATASETS_DIR};
  return c;
}

inline ModelSpec model(const std::string& name) { return catalog().model(name); }

// A resolved plan: defaults, then the caller's settings, then resolve_plan's checks.
inline PlanSpec plan_for(const ModelSpec& m, const std::function<void(PlanSpec&)>& set) {
  PlanSpec p;
  set(p);
  return resolve_plan(p, m, nullptr);
}

inline CompiledPlan compile(const std::string& model_name, const std::function<void(PlanSpec&)>& set) {
  const ModelSpec m = model(model_name);
  return compile_plan(m, plan_for(m, set));
}

}  // namespace px::test
