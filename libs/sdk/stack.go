package sdk

// growStack grows the calling goroutine's stack in one step to what running a run
// takes. A goroutine starts with a small stack, and a run's path (decoding its doorbell,
// encoding the claim's parameters, the workflow's code, each step's write) outgrows it
// several times over, each time copying the stack so far: measured on S2, 8 % of the
// executor's CPU went to copying stacks, under 1 % with this. Grown here, at the bottom
// of the goroutine, there is almost nothing to copy yet.
//
// The frame is read at an index the compiler cannot know, so that it is kept.
//
//go:noinline
func growStack() byte {
	var frame [stackFrameBytes]byte
	return frame[stackFrameIndex]
}

// stackFrameBytes is sized so that the runtime's single growth (it doubles the stack
// until the frame fits) lands on 16 KiB, which the path of most runs reaches anyway:
// a larger stack removed little more of the copying and cost more memory per run.
const stackFrameBytes = 8 << 10

var stackFrameIndex = stackFrameBytes - 1
