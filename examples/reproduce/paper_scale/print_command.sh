# PRINT=1 for the launch scripts here: print `fairseq-train ARGS...` as one command to paste into a shell: each
# argument quoted where the shell needs it, lines of at most about 110 characters broken before an option.
print_command() {
  local safe='^[A-Za-z0-9_./:=,+@%-]+$' line="$1" unit="" arg
  shift
  for arg in "$@" --; do  # the final -- only flushes the last option
    [[ $arg =~ $safe ]] || arg=${arg@Q}
    if [[ $arg == --* && -n $unit ]]; then
      if (( ${#line} + ${#unit} > 110 )); then printf '%s \\\n' "$line"; line="  ${unit# }"; else line+="$unit"; fi
      unit=""
    fi
    unit+=" $arg"
  done
  printf '%s\n' "$line"
}
